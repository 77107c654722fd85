"""The ternary projections of one 2B-4T layer, per row count, on every CPU path side by side.

    native        the packed 2-bit kernel (what decode runs)
    unpack+int8   the layer unpacked into a reused int8 buffer, then torch._int_mm (what prefill runs)
    int8 stored   torch._int_mm on int8 weights kept unpacked (the path before packing; 4x the bytes)

For each row count it prints ms per layer and the weight bytes read per second (packed bytes for
the packed paths, int8 bytes for the stored one). kernels.NATIVE_MAX_ROWS should sit where native
stops winning. Run on an idle machine:

    python benchmarks/ternary_kernels.py --threads 2 [--rows 1,8,16,32,64,128,256,512] [--isa avx2]
"""

from __future__ import annotations

import argparse
import os

import torch


def _best_ms(fn, repeats: int) -> float:
    """Best of `repeats` calls after one warm-up call, in ms."""
    from pybitnet.bench import best_seconds

    fn()
    return best_seconds(fn, repeats) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--isa", choices=("auto", "avx2", "avx512", "scalar"), default="auto")
    args = parser.parse_args()
    os.environ["PYBITNET_NATIVE_ISA"] = args.isa
    from pybitnet import kernels, preset
    from pybitnet.quant.packed import pack_ternary

    if not kernels.native_available():
        raise SystemExit("the native kernels are not available here")
    torch.set_num_threads(args.threads)
    c = preset("bitnet-b1.58-2b-4t")
    shapes = [(c.q_size + 2 * c.kv_size, c.hidden_size), (c.hidden_size, c.q_size),
              (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]  # fused, as BitLinear holds them
    g = torch.Generator().manual_seed(0)
    stored = [torch.randint(-1, 2, shape, generator=g, dtype=torch.int8) for shape in shapes]
    packed = [pack_ternary(w) for w in stored]
    packed_bytes, int8_bytes = sum(p.numel() for p in packed), sum(w.numel() for w in stored)
    print(f"threads {args.threads}, isa {args.isa}; one layer: {packed_bytes / 1e6:.1f} MB packed, {int8_bytes / 1e6:.1f} MB int8")
    print(f"{'rows':>5} | {'native ms':>10} {'GB/s':>6} | {'unpack+int8 ms':>14} | {'int8 stored ms':>14} {'GB/s':>6}")
    for rows in (int(r) for r in args.rows.split(",")):
        qs = [torch.randint(-128, 128, (rows, shape[1]), generator=g, dtype=torch.int8) for shape in shapes]
        native = _best_ms(lambda: [kernels.accumulate(q, p, "native") for q, p in zip(qs, packed)], args.repeats)
        unpack = _best_ms(lambda: [kernels.accumulate(q, p, "int8") for q, p in zip(qs, packed)], args.repeats)
        plain = _best_ms(lambda: [torch._int_mm(q, w.t()) for q, w in zip(qs, stored)], args.repeats)
        print(f"{rows:>5} | {native:>10.2f} {packed_bytes / native / 1e6:>6.1f} | {unpack:>14.2f} | "
              f"{plain:>14.2f} {int8_bytes / plain / 1e6:>6.1f}")


if __name__ == "__main__":
    main()
