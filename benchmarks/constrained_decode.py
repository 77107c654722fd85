"""Constrained decoding against unconstrained: decode tokens/s and time to first token, no server.

A random model of a preset's shape (2B-4T by default: 30 layers) with the synthetic byte-level BPE of its
vocabulary size (benchmarks/serve_load.synthetic_bpe; 128256 tokens for 2B-4T) generates with
pybitnet.generate.generate:
  - decode tokens/s at batch 1 and batch 8, unconstrained (end-of-text ignored, so every row runs
    --tokens tokens) and under a 20-property JSON schema, with masks computed ahead in the background
    thread (the default) and on the decoding thread right when sampling needs them (PREFETCH off);
  - time from the request to the first token for a schema never seen before (compiling it included,
    20 properties, new property names each time so no cache helps) against unconstrained, best of --repeats.
Each constrained row is held to the schema; its decode tokens/s counts the tokens it produced.

Full size (about 15 minutes on an idle 2-core machine):
    python benchmarks/constrained_decode.py --threads 2 --json benchmarks/results/constrained_decode.json
Check at a tiny size:
    python benchmarks/constrained_decode.py --preset small --layers 2 --tokens 16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import synthetic_bpe  # noqa: E402

import pybitnet.constraints as constraints  # noqa: E402
from pybitnet.constraints import compile_constraint  # noqa: E402
from pybitnet.generate import generate  # noqa: E402
from pybitnet.synthetic import random_model  # noqa: E402
from pybitnet.tokenizer import Tokenizer  # noqa: E402


def schema(properties: int = 20, tag: str = "") -> dict:
    """An object of `properties` bounded fields (strings, integers, enums, booleans, small arrays)."""
    kinds = [{"type": "string", "maxLength": 12}, {"type": "integer", "minimum": 0, "maximum": 100000},
             {"enum": ["alpha", "beta", "gamma", "delta"]}, {"type": "boolean"},
             {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}]
    names = [f"field_{tag}{i}" for i in range(properties)]
    return {"type": "object", "properties": {n: kinds[i % len(kinds)] for i, n in enumerate(names)},
            "required": names, "additionalProperties": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bitnet-b1.58-2b-4t")
    parser.add_argument("--layers", type=int, default=None, help="default: the preset's (30 for 2B-4T)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3, help="time-to-first-token runs (best is kept)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.preset, seed=0, num_layers=args.layers)
    vocab = int(model.config.vocab_size)
    tokenizer = Tokenizer(synthetic_bpe(vocab), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    start = time.perf_counter()
    constraint = compile_constraint("json_schema", schema(), tokenizer, vocab_size=vocab)
    setup_s = time.perf_counter() - start  # llguidance's view of the vocabulary (once per process) + compiling
    prompt = "Write the record as JSON: "
    results = {"preset": args.preset, "layers": model.config.num_layers, "threads": args.threads, "vocab": vocab,
               "tokens": args.tokens, "tokenizer_and_first_compile_s": setup_s, "decode": []}
    generate(model, tokenizer, [prompt], max_new_tokens=2, stop_token_ids=[])  # warm-up
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [f"{prompt}{i}" for i in range(batch)]
        generate(model, tokenizer, prompts, max_new_tokens=4, stop_token_ids=[])  # warm-up at this batch size
        runs = {"unconstrained": dict(stop_token_ids=[]),
                "schema, masks ahead": dict(constraint=constraint, prefetch=True),
                "schema, masks when sampling": dict(constraint=constraint, prefetch=False)}
        for name, options in runs.items():
            constraints.PREFETCH = options.pop("prefetch", True)
            result = generate(model, tokenizer, prompts, max_new_tokens=args.tokens, **options)
            row = {"batch": batch, "run": name, "decode_tokens_per_s": result.decode_tokens_per_s,
                   "generated": result.generated_tokens, "finish": sorted(set(result.finish_reasons))}
            results["decode"].append(row)
            print(json.dumps(row))
    constraints.PREFETCH = True
    ttft = {"unconstrained": [], "new 20-property schema": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate(model, tokenizer, [prompt], max_new_tokens=1, stop_token_ids=[])
        ttft["unconstrained"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh = compile_constraint("json_schema", schema(tag=uuid.uuid4().hex[:6] + "_"), tokenizer, vocab_size=vocab)
        generate(model, tokenizer, [prompt], max_new_tokens=1, constraint=fresh)
        ttft["new 20-property schema"].append(time.perf_counter() - start)
    results["time_to_first_token_s"] = {k: min(v) for k, v in ttft.items()}
    print(json.dumps(results["time_to_first_token_s"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
