"""The block-table heads alone, per block type: the exact head (`quant_head`) and lm_head="int8" over the
blocks (`quant_head_int8`), one activation row (a decode step), on random tables.

Two tables per type, both --hidden wide:
    resident   --resident-rows vocabulary rows, small enough to stay in a core's L2 cache: what the kernel's
               instructions cost, whatever the memory does (run it with --threads 1 for a per-core figure);
    full       --vocab rows (the 2B-4T head): what a decode step's head costs, memory included.
Each figure is the best of --repeats calls minus the best call on a one-row table (the per-call setup:
activation quantization, output, threads), in GB/s of blocks and G values/s. Run on an idle machine:

    python benchmarks/quant_head_kernels.py --threads 1 [--types q8_0,q6_k,q5_k,q4_k,q4_0] [--no-full] [--isa avx2]
"""

from __future__ import annotations

import argparse
import os

import torch


def _best_s(fn, repeats: int) -> float:
    """Best of `repeats` calls after one warm-up call."""
    from pybitnet.bench import best_seconds

    fn()
    return best_seconds(fn, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--types", default="q8_0,q6_k,q5_k,q4_k,q4_0")
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--resident-rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=2000, help="calls on the resident table (the full one: 20)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-vocabulary table")
    parser.add_argument("--isa", choices=("auto", "avx512", "avx2", "scalar"), default="auto")
    args = parser.parse_args()
    os.environ["PYBITNET_NATIVE_ISA"] = args.isa
    from pybitnet import native
    from pybitnet.quant.ggml_blocks import NATIVE_KIND, QuantizedTable

    ops = native.ops()
    if ops is None:
        raise SystemExit("the native kernels are not available here")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, args.hidden, generator=g)
    isa = native.isa()
    print(f"threads {args.threads}, isa {args.isa}, hidden {args.hidden}"
          + ("" if native.has_avx512_vnni() else "; AVX-512 VNNI not in use: quant_head_int8 runs its scalar body"))
    print(f"{'type':>5} {'table':>8} {'rows':>7} | {'exact GB/s':>10} {'G val/s':>8} | {'int8 GB/s':>9} {'G val/s':>8}")
    sizes = [("resident", args.resident_rows, args.repeats)] + ([] if args.no_full else [("full", args.vocab, 20)])
    for type_name in (t.strip().upper() for t in args.types.split(",")):
        kind = NATIVE_KIND[type_name]
        for label, rows, repeats in sizes:
            weights = torch.randn(rows, args.hidden, generator=g) * 0.05
            blocks = QuantizedTable.quantize(weights, type_name).data  # (rows, bytes per row) uint8
            del weights
            figures = []
            for kernel in (ops.quant_head, ops.quant_head_int8):
                setup = _best_s(lambda: kernel(h, blocks[:1], kind, isa), repeats)
                seconds = max(_best_s(lambda: kernel(h, blocks, kind, isa), repeats) - setup, 1e-9)
                figures += [blocks.numel() / seconds / 1e9, rows * args.hidden / seconds / 1e9]
            print(f"{type_name:>5} {label:>8} {rows:>7} | {figures[0]:>10.1f} {figures[1]:>8.1f} | "
                  f"{figures[2]:>9.1f} {figures[3]:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
