"""Peak and steady resident memory of a process that loads a 2B-4T-shaped I2_S GGUF and decodes a few tokens.

The file is written first (random ternary weights, the embedding table as --embed-type: F16 by
default, or Q8_0 / Q4_0 / Q6_K / Q5_K / Q4_K blocks that the loader keeps as stored) by this script's parent process;
a fresh child loads it with `pybitnet.load(path, lm_head=...)` and decodes, so the figures count only
what loading and decoding need:

    load peak   VmHWM when `pybitnet.load` returns: the most loading itself held
    peak        VmHWM after a 128-token prefill and 8 decode steps: loading, or the first forward's working
                set (its KV cache, the int8 scratch the prefill unpacks projections into, activations)
    steady      VmRSS after the decode steps, the cache dropped and `runtime.release_memory()` (the C
                heap's free pages handed back): what the loaded model keeps
    ratios      load peak / steady and peak / steady: how far the process overshoots what it keeps

    python benchmarks/load_rss.py [--layers 30] [--lm-head exact|int8|q8_0|q6_k|q4_k]
                                  [--embed-type f16|bf16|f32|q8_0|q6_k|q5_k|q4_k|q4_0] [--keep FILE]

With --keep the file is written once and reused by later runs (a 2B-4T Q6_K table takes ~40 s to quantize).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import gc, json, sys, torch, pybitnet
from pybitnet import runtime

if int(sys.argv[3]):
    torch.set_num_threads(int(sys.argv[3]))

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

model = pybitnet.load(sys.argv[1], lm_head=sys.argv[2])
load_peak = status("VmHWM")
cache = model.new_cache(1, 160)
logits = model.prefill(torch.randint(0, model.config.vocab_size, (1, 128)), cache)
for _ in range(8):
    logits = model.decode_step(logits.argmax(-1), cache)
peak = status("VmHWM")
del logits, cache
gc.collect()
runtime.release_memory()
print(json.dumps({"load_peak": load_peak, "peak": peak, "steady": status("VmRSS")}))
"""


def rss_after_decode(path: str, lm_head: str = "exact", threads: int = 0) -> dict:
    """Load peak, peak (VmHWM) and steady RSS (VmRSS at the end: what the loaded model holds) of a fresh
    process that loads `path` and decodes a few tokens; threads 0 leaves torch's default."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), lm_head, str(threads)], capture_output=True,
                         text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return {"load_peak_rss_bytes": figures["load_peak"], "peak_rss_bytes": figures["peak"],
            "steady_rss_bytes": figures["steady"]}


def main() -> int:
    from pybitnet.head import HEAD_MODES
    from pybitnet.loaders.gguf import EMBED_TYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="layers of a file written here (a kept file has its own)")
    parser.add_argument("--lm-head", default="exact", choices=HEAD_MODES)
    parser.add_argument("--embed-type", default="f16", choices=tuple(EMBED_TYPES),
                        help="type of the embedding table written (a 2B-4T table: q6_k quantizes 328M values first)")
    parser.add_argument("--keep", help="write the GGUF here and keep it, or reuse it if it exists (default: a temporary file)")
    args = parser.parse_args()
    from pybitnet import preset
    from pybitnet.loaders.gguf import write_gguf
    from pybitnet.synthetic import random_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or os.path.join(tmp, f"model-i2_s-{args.embed_type}.gguf")
        if not os.path.exists(path):
            config = preset("bitnet-b1.58-2b-4t").replace(num_layers=args.layers)
            write_gguf(path, config, random_weights(config, 0), "i2_s", embed_type=args.embed_type)
        figures = rss_after_decode(path, args.lm_head)
    print(json.dumps({"layers": args.layers, "lm_head": args.lm_head, "embed_type": args.embed_type, **figures,
                      "load_peak_rss_gib": round(figures["load_peak_rss_bytes"] / 2**30, 3),
                      "peak_rss_gib": round(figures["peak_rss_bytes"] / 2**30, 3),
                      "steady_rss_gib": round(figures["steady_rss_bytes"] / 2**30, 3),
                      "load_peak_over_steady": round(figures["load_peak_rss_bytes"] / figures["steady_rss_bytes"], 3),
                      "peak_over_steady": round(figures["peak_rss_bytes"] / figures["steady_rss_bytes"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
