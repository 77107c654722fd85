"""Run the whole benchmark suite, with the llama.cpp comparison.

    python benchmarks/run_suite.py [--layers 30] [--threads 2] [--skip-llama] [--out DIR] [--output FILE]

Writes DIR/suite.json, DIR/ms_per_token.png and the markdown report FILE (default: DIR/BENCHMARKS.md;
DIR defaults to benchmarks/results/latest). The committed report is replaced only when asked:
`--output BENCHMARKS.md --out benchmarks/results`. Run it on an idle machine: the load is recorded and a
busy machine is flagged.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pybitnet import bench  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-llama", action="store_true", help="leave out the llama.cpp comparison")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latest"), help="directory for JSON and plot")
    parser.add_argument("--output", default=None, help="the markdown report (default: OUT/BENCHMARKS.md)")
    args = parser.parse_args(argv)
    args.output = args.output or os.path.join(args.out, "BENCHMARKS.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    outputs = (os.path.join(args.out, "suite.json"), args.output, os.path.join(args.out, "ms_per_token.png"))
    bench.check_outputs(*outputs)
    results = bench.run_suite(layers=args.layers, threads=args.threads,
                              progress=lambda message, _seconds: print(message, flush=True))
    print("scaling with 6 layers", flush=True)
    six = bench.run_suite(layers=6, threads=args.threads, sections=("scaling",))
    results["scaling_6_layers"] = {"note": "a separate 6-layer model", "scaling": six["scaling"]}
    if not args.skip_llama:
        print("llama.cpp comparison", flush=True)
        from llama_cpp_compare import compare

        results["vs_llama_cpp"] = compare(layers=args.layers, threads=args.threads)
    bench.save(results, *outputs)
    print(bench.markdown(results))
    print(f"wrote {', '.join(outputs)}")


if __name__ == "__main__":
    main()
