"""Decode tokens/s at several batch sizes on the 2B-4T shape: what a batch of B rows costs per step.

Each batch size prefills 128 tokens per row, then times decode_step (best of --rounds runs of
--steps steps). tokens/s counts every row's token; GB/s is the weight bytes one step reads
(bench.weight_bytes_per_step) over the step time. Run on an idle machine:

    python benchmarks/batched_decode.py --layers 30 --threads 2 [--batches 1,8] [--lm-head int8] [--gguf FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lm-head", default="exact", choices=("exact", "int8"))
    parser.add_argument("--gguf", help="load this file instead of building a random 2B-4T-shaped model")
    args = parser.parse_args()
    import pybitnet
    from pybitnet.bench import weight_bytes_per_step
    from pybitnet.model import Transformer
    from pybitnet.synthetic import random_weights

    torch.set_num_threads(args.threads)
    if args.gguf:
        model = pybitnet.load(args.gguf, lm_head=args.lm_head)
    else:
        config = pybitnet.preset("bitnet-b1.58-2b-4t").replace(num_layers=args.layers)
        model = Transformer(config, random_weights(config, 0), release_weights=True, lm_head=args.lm_head)
    step_bytes = weight_bytes_per_step(model)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        cache = model.new_cache(batch, args.context + args.rounds * args.steps + 2)
        g = torch.Generator().manual_seed(batch)
        logits = model.prefill(torch.randint(0, model.config.vocab_size, (batch, args.context), generator=g), cache)
        token = logits.argmax(-1)
        model.decode_step(token, cache)  # warm-up
        best = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.steps):
                model.decode_step(token, cache)
            best = min(best, (time.perf_counter() - start) / args.steps)
        results.append({"batch": batch, "ms_per_step": 1e3 * best, "tok_s": batch / best, "weight_gb_s": step_bytes / best / 1e9})
        print(json.dumps(results[-1]), flush=True)
    if len(results) > 1:
        print(json.dumps({"tok_s_ratio_last_vs_first": results[-1]["tok_s"] / results[0]["tok_s"],
                          "lm_head": args.lm_head, "threads": args.threads, "layers": model.config.num_layers}))


if __name__ == "__main__":
    main()
