"""GPU checks of the engine's CUDA path (run by hand on a machine with a GPU; never part of CI).

    PYTHONPATH=src python benchmarks/device_check.py OUT_DIR

1. every backend's accumulators on CUDA equal the CPU reference bit for bit;
2. forward_full == forward_step_by_step on CUDA (float64 rule, float32 rule), and CUDA float32 vs
   the CPU float64 model (float32 rule), for a few random configs and a ragged batch;
3. speed of the 2B-4T shape (30 layers) on the GPU: forward_full T=512, step-by-step, decode.
Writes device_check.json to OUT_DIR and prints a summary; a failing section is recorded, not fatal.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch

sys.path.insert(0, "tests")
from rules import compare  # noqa: E402

import pybitnet  # noqa: E402
from pybitnet import ModelConfig, kernels, synthetic  # noqa: E402
from pybitnet.model import Transformer  # noqa: E402

DEV = torch.device("cuda")
results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def section(name):
    def wrap(fn):
        start = time.time()
        try:
            results[name] = fn()
        except Exception as err:  # record and go on: one broken section must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        print(name, json.dumps(results[name], default=str)[:1500], f"({time.time() - start:.1f}s)", flush=True)
        return fn
    return wrap


@section("kernels_bit_exact")
def _():
    out = {}
    for m, k, n in [(17, 2560, 640), (64, 6912, 2560), (512, 2560, 13824), (1, 64, 32)]:
        q = torch.randint(-128, 128, (m, k)).float()
        w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
        ref = kernels.accumulate(q.double(), w, "reference")
        for backend in ("reference", "int8"):
            if backend == "int8" and m <= 16:
                continue
            got = kernels.accumulate(q.to(DEV), w.to(DEV), backend).double().cpu()
            out[f"{backend} {m}x{k}x{n}"] = bool(torch.equal(got, ref))
    return out


CONFIGS = [
    ModelConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8, num_kv_heads=2, hidden_act="relu2"),
    ModelConfig(vocab_size=3000, hidden_size=192, intermediate_size=320, num_layers=2, num_heads=6, num_kv_heads=2,
                head_dim=64, hidden_act="silu", tie_word_embeddings=False),
    ModelConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4, num_kv_heads=4, hidden_act="relu2"),
]


@section("equivalence")
def _():
    out = []
    for i, cfg in enumerate(CONFIGS):
        weights = synthetic.random_weights(cfg, i, embed_dtype=torch.float32)
        cpu64 = Transformer(cfg, dict(weights), dtype=torch.float64)
        tokens = torch.randint(0, cfg.vocab_size, (3, 80))
        mask = (torch.arange(80)[None] < torch.tensor([[80], [33], [61]])).long()
        ref = cpu64.forward_full(tokens, attention_mask=mask)
        real = mask.bool()
        for dtype in (torch.float64, torch.float32):
            gpu = Transformer(cfg, dict(weights), dtype=dtype, device=DEV)
            full = gpu.forward_full(tokens.to(DEV), attention_mask=mask.to(DEV)).cpu()
            step = gpu.forward_step_by_step(tokens.to(DEV), attention_mask=mask.to(DEV)).cpu()
            chunked = gpu.forward_full(tokens.to(DEV), attention_mask=mask.to(DEV), chunk_size=17).cpu()
            row = {"config": i, "dtype": str(dtype)}
            for name, (a, b) in {"full_vs_step": (full, step), "full_vs_cpu64": (full, ref),
                                 "chunked_vs_full": (chunked, full)}.items():
                rel, top1 = compare(a, b, real)
                limit = (1e-9, 1.0) if dtype == torch.float64 else (5e-2, 0.9)
                row[name] = {"max_rel": rel, "top1": top1, "ok": rel <= limit[0] and top1 >= limit[1]}
            out.append(row)
    return out


@section("speed_2b4t")
def _():
    torch.manual_seed(0)
    model = synthetic.random_model("bitnet-b1.58-2b-4t", seed=0, device=DEV)
    vocab = model.config.vocab_size

    def timed(fn, n=3):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    out = {}
    for seq in (128, 512, 2048):
        tokens = torch.randint(0, vocab, (1, seq), device=DEV)
        out[f"full_T{seq}_tok_s"] = seq / timed(lambda: model.forward_full(tokens, logits="last"))
    tokens = torch.randint(0, vocab, (1, 64), device=DEV)
    out["step_T64_tok_s"] = 64 / timed(lambda: model.forward_step_by_step(tokens), n=1)
    out["full_T64_all_logits_tok_s"] = 64 / timed(lambda: model.forward_full(tokens))
    cache = model.new_cache(1, 200)
    model.prefill(torch.randint(0, vocab, (1, 128), device=DEV), cache)
    tok = torch.tensor([1], device=DEV)
    out["decode_ctx128_tok_s"] = 1 / timed(lambda: model.decode_step(tok, cache), n=20)
    out["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


if __name__ == "__main__":
    dest = sys.argv[1] if len(sys.argv) > 1 else "."
    with open(f"{dest}/device_check.json", "w") as f:
        json.dump(results, f, indent=2, default=str)
