"""Prefill with packed 2-bit weights against the same model with its weights held as int8, side by side.

`packed` is the model as pybitnet builds it on CPU: 2-bit weights, each layer unpacked into a reused
int8 buffer for `torch._int_mm`, activations quantized by the native ops. `int8 stored` is the same
model with every projection's weights replaced by their int8 (N, K) form, the layout pybitnet held
before packing (4x the bytes): `_int_mm` reads them directly and the torch path quantizes. Rounds
alternate between the two, so machine load hits both alike; each side's figure is its best round.

    python benchmarks/prefill_packed_vs_int8.py --layers 30 --threads 2 --tokens 512
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
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import pybitnet
    from pybitnet.layers import BitLinear
    from pybitnet.quant.packed import unpack_ternary

    torch.set_num_threads(args.threads)
    packed = pybitnet.synthetic.random_model("bitnet-b1.58-2b-4t", seed=0, num_layers=args.layers)
    stored = pybitnet.synthetic.random_model("bitnet-b1.58-2b-4t", seed=0, num_layers=args.layers)
    for module in stored.modules():
        if isinstance(module, BitLinear):  # the int8 (N, K) layout, read by _int_mm as it is
            module.ternary_weights = unpack_ternary(module.ternary_weights, module.in_features)[:, : module.in_features].contiguous()
    tokens = torch.randint(0, packed.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    assert torch.equal(packed.forward_full(tokens[:, :16], logits="last").argmax(-1),
                       stored.forward_full(tokens[:, :16], logits="last").argmax(-1))
    best = {"packed": float("inf"), "int8 stored": float("inf")}
    for _ in range(args.rounds):
        for name, model in (("packed", packed), ("int8 stored", stored)):
            start = time.perf_counter()
            model.forward_full(tokens, logits="last")
            best[name] = min(best[name], time.perf_counter() - start)
    result = {"layers": args.layers, "threads": args.threads, "tokens": args.tokens,
              **{f"{name} tok/s": args.tokens / s for name, s in best.items()},
              "packed / int8 stored": best["int8 stored"] / best["packed"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
