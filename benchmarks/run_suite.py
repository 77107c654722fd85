"""Run the whole benchmark suite and write the committed results.

    python benchmarks/run_suite.py [--layers 30] [--threads 2] [--skip-llama]

Writes benchmarks/results/suite.json, BENCHMARKS.md (repo root) and benchmarks/results/ms_per_token.png.
Run it on an idle machine: the load average is recorded and a busy machine is flagged.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pybitnet import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-llama", action="store_true", help="leave out the llama.cpp comparison")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = bench.run_suite(layers=args.layers, threads=args.threads, progress=lambda m: print(m, flush=True))
    print("scaling with 6 layers", flush=True)
    six = bench.run_suite(layers=6, threads=args.threads, sections=("scaling",))
    results["scaling_6_layers"] = {"note": "a separate 6-layer model, the issue's scaling target", "scaling": six["scaling"]}
    if not args.skip_llama:
        print("llama.cpp comparison", flush=True)
        from llama_cpp_compare import compare

        results["vs_llama_cpp"] = compare(layers=args.layers, threads=args.threads)
    bench.save(results, os.path.join(args.out, "suite.json"), os.path.join(HERE, "..", "BENCHMARKS.md"),
               os.path.join(args.out, "ms_per_token.png"))
    print(bench.markdown(results))


if __name__ == "__main__":
    main()
