"""Corpus scoring throughput: Ray Data (A actors x 1 thread) against one local process (A threads), side by side.

Both sides score the same corpus of random token-id documents with the same model file and windows, and
both are timed end to end as a user runs the job: the local side loads the model and scores the documents
one after another; the Ray side starts its actors (each loads the model) and scores through `score_corpus`.
The model is a 2B-4T-shaped random model written once, before either side is timed, as a GGUF I2_S file
with F16 embeddings (the form a user scores with), unless --model names a checkpoint.
The two results must agree (float32 rule on the corpus perplexity), else the run fails.

    python benchmarks/ray_scoring.py                       # 2B-4T shape, 6 layers, 2 actors vs 2 threads
    python benchmarks/ray_scoring.py --layers 1 --documents 8 --tokens 32 --preset tiny   # a quick check

Run it on an otherwise idle machine: both sides need every core.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def corpus_rows(documents: int, tokens: int, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(documents):
        n = int(torch.randint(tokens // 2, tokens + 1, (1,), generator=gen))  # lengths vary, like real documents
        rows.append({"id": f"doc-{i:05d}", "tokens": torch.randint(0, vocab, (n,), generator=gen).tolist()})
    return rows


def run_local(spec: str, rows: list[dict], threads: int, ctx: int) -> tuple[float, object]:
    import pybitnet
    from pybitnet import corpus

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = pybitnet.load(spec)
    docs = [corpus.Document(r["id"], (0, i), tokens=r["tokens"]) for i, r in enumerate(rows)]
    result = corpus.score_documents(model, None, docs, ctx=ctx)
    return time.perf_counter() - start, result


def run_ray(spec: str, rows: list[dict], actors: int, ctx: int) -> tuple[float, object]:
    import ray

    from pybitnet.distributed import score_corpus

    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(rows)
    start = time.perf_counter()
    result = score_corpus(spec, dataset, actors=actors, threads_per_actor=1, ctx=ctx, batch_documents=4)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bitnet-b1.58-2b-4t")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (1 thread each) = local threads")
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256, help="longest document; lengths vary from half of it")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--model", help="a checkpoint to score with (default: write the random model's GGUF)")
    parser.add_argument("--json", dest="json_path", help="write the figures here")
    args = parser.parse_args()

    from pybitnet.config import preset

    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model or write_model(args.preset, args.layers, os.path.join(tmp, "model-i2_s.gguf"))
        compare(args, spec, preset(args.preset).vocab_size)


def write_model(preset_name: str, layers: int, path: str) -> str:
    from pybitnet.config import preset
    from pybitnet.loaders.gguf import write_gguf
    from pybitnet.synthetic import random_weights

    config = preset(preset_name).replace(num_layers=layers)
    write_gguf(path, config, random_weights(config, 0), "i2_s", embed_type="f16")
    return path


def compare(args: argparse.Namespace, spec: str, vocab: int) -> None:
    import ray

    rows = corpus_rows(args.documents, args.tokens, vocab, seed=0)
    total_tokens = sum(len(r["tokens"]) for r in rows)
    # Ray first, and shut down before the local run, so neither side competes with the other's processes
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    try:
        ray_seconds, ray_result = run_ray(spec, rows, args.actors, args.ctx)
    finally:
        ray.shutdown()
    local_seconds, local_result = run_local(spec, rows, args.actors, args.ctx)

    rel = abs(ray_result.perplexity - local_result.perplexity) / local_result.perplexity
    if rel > 5e-2 or ray_result.failed or local_result.failed:
        raise SystemExit(f"results differ: ray {ray_result.perplexity} vs local {local_result.perplexity}")
    figures = {
        "model": args.model or f"{args.preset}, {args.layers} layers, GGUF I2_S + F16 embeddings", "documents": args.documents, "tokens": total_tokens, "ctx": args.ctx, "actors": args.actors,
        "ray_seconds": ray_seconds, "ray_tokens_per_s": total_tokens / ray_seconds,
        "local_threads": args.actors, "local_seconds": local_seconds, "local_tokens_per_s": total_tokens / local_seconds,
        "ratio_ray_over_local": local_seconds / ray_seconds, "perplexity_relative_difference": rel,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
    }
    print(f"{spec}: {args.documents} documents, {total_tokens} tokens, ctx {args.ctx}")
    print(f"  ray   {args.actors} actors x 1 thread : {figures['ray_tokens_per_s']:8.1f} tokens/s ({ray_seconds:.1f} s)")
    print(f"  local 1 process x {args.actors} threads: {figures['local_tokens_per_s']:8.1f} tokens/s ({local_seconds:.1f} s)")
    print(f"  ratio ray / local: {figures['ratio_ray_over_local']:.2f} (target >= 0.8)")
    if args.json_path:
        with open(args.json_path + ".tmp", "w") as f:
            json.dump(figures, f, indent=2)
        os.replace(args.json_path + ".tmp", args.json_path)


if __name__ == "__main__":
    main()
