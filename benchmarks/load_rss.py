"""Peak resident memory of a process that loads a 2B-4T-shaped I2_S GGUF and decodes a few tokens.

The file is written first (random ternary weights, the embedding table as --embed-type: F16 by
default, or Q8_0 / Q4_0 / Q6_K / Q5_K / Q4_K blocks that the loader keeps as stored) by this script's parent process;
a fresh child loads it with `pybitnet.load` and decodes, and its VmHWM (peak RSS) is reported, so
the figure counts only what loading and decoding need; its VmRSS at the end (steady RSS) too.

    python benchmarks/load_rss.py [--layers 30] [--lm-head exact|int8] [--embed-type f16|q8_0|q6_k|q5_k|q4_k|q4_0] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import sys, torch, pybitnet
if int(sys.argv[3]):
    torch.set_num_threads(int(sys.argv[3]))
model = pybitnet.load(sys.argv[1], lm_head=sys.argv[2])
cache = model.new_cache(1, 160)
logits = model.prefill(torch.randint(0, model.config.vocab_size, (1, 128)), cache)
for _ in range(8):
    logits = model.decode_step(logits.argmax(-1), cache)
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS"))}
print(status["VmHWM"], status["VmRSS"])
"""


def rss_after_decode(path: str, lm_head: str = "exact", threads: int = 0) -> dict:
    """Peak RSS (VmHWM) and RSS at the end (VmRSS, what the loaded model holds) of a fresh process that
    loads `path` and decodes a few tokens; threads 0 leaves torch's default."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), lm_head, str(threads)], capture_output=True,
                         text=True, check=True)
    peak, steady = (int(x) for x in out.stdout.split()[-2:])
    return {"peak_rss_bytes": peak, "steady_rss_bytes": steady}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--lm-head", default="exact", choices=("exact", "int8"))
    parser.add_argument("--embed-type", default="f16", choices=("f16", "bf16", "f32", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0"),
                        help="type of the embedding table written (a 2B-4T table: q6_k quantizes 328M values first)")
    parser.add_argument("--keep", help="write the GGUF here and keep it (default: a temporary file)")
    args = parser.parse_args()
    from pybitnet import preset
    from pybitnet.loaders.gguf import write_gguf
    from pybitnet.synthetic import random_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or os.path.join(tmp, f"model-i2_s-{args.embed_type}.gguf")
        if not os.path.exists(path):
            config = preset("bitnet-b1.58-2b-4t").replace(num_layers=args.layers)
            write_gguf(path, config, random_weights(config, 0), "i2_s", embed_type=args.embed_type)
        rss = rss_after_decode(path, args.lm_head)
    print(json.dumps({"layers": args.layers, "lm_head": args.lm_head, "embed_type": args.embed_type, **rss,
                      "peak_rss_gib": rss["peak_rss_bytes"] / 2**30}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
