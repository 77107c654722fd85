"""Cross-validation against Hugging Face transformers' BitNetForCausalLM.

Tiny checkpoints written by our HF writer are loaded from disk by both, as a user would
(`AutoModelForCausalLM.from_pretrained(dir, dtype=float32)` / `pybitnet.load(dir)`), and their float32
logits are held to the float32 rule of docs/exactness.md: max |dlogit| <= 5e-2 * max|logit| and the same
argmax at >= 90% of positions. Both are also held to the float64 numpy reference (tests/reference_numpy.py),
which closes the triangle: a bug shared by our writer and our loader would still show against HF.

The measured figures are printed (run with -s) and attached to the junit report as properties.

transformers wraps its BitNet helpers (unpack_weights, activation_quant) in @torch.compile; on a 2-core
CPU compiling them costs ~20 s per model, so they run eagerly here (the same torch ops, uncompiled).
Set PYBITNET_XVAL_COMPILE=1 to keep transformers' compilation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import pybitnet  # noqa: E402
from pybitnet.config import ModelConfig  # noqa: E402
from pybitnet.loaders.hf import save_hf  # noqa: E402
from pybitnet.synthetic import random_weights  # noqa: E402



import reference_numpy  # noqa: E402  # tests/ is on sys.path: pytest's default import mode puts it there

F32_REL_TOL = 5e-2
F32_MIN_TOP1 = 0.90
SEQ = 48


def _config(*, act: str, tie: bool, heads: int, kv_heads: int) -> ModelConfig:
    # q width == hidden: transformers sizes attn_sub_norm by hidden_size
    return ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=heads,
                       num_kv_heads=kv_heads, hidden_act=act, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_ids=(2,))


# id -> (config, linear_class, embedding dtype on disk)
CASES = {
    "relu2-autobitlinear-tied": (_config(act="relu2", tie=True, heads=4, kv_heads=1), "autobitlinear", torch.float32),
    "silu-bitlinear-tied": (_config(act="silu", tie=True, heads=4, kv_heads=2), "bitlinear", torch.float32),
    "relu2-autobitlinear-untied": (_config(act="relu2", tie=False, heads=8, kv_heads=2), "autobitlinear",
                                   torch.float32),
}


def _hf_context():
    if os.environ.get("PYBITNET_XVAL_COMPILE") == "1":
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(disable=True)


def _load_transformers(path: Path, dtype: torch.dtype | None = torch.float32):
    """dtype None: the checkpoint's own torch_dtype, as `from_pretrained(dir)` gives it."""
    from transformers import AutoModelForCausalLM

    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {} if dtype is None else {"dtype" if major >= 5 else "torch_dtype": dtype}
    with _hf_context():
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **dtype_kw)
    # nothing may be left randomly initialized or ignored: every tensor we wrote must be used
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"transformers did not load our files cleanly: {problems}"
    assert type(model).__name__ == "BitNetForCausalLM"
    return model.eval()


def _hf_logits(model, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    with torch.no_grad(), _hf_context():
        out = model(input_ids=tokens, attention_mask=mask).logits  # (B, T, V)
    return out.double().numpy()


def compare_f32(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(max |d| / max|theirs|, fraction of positions with the same argmax) over (T, V) logits."""
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    return rel, top1


def assert_f32_rule(ours: np.ndarray, theirs: np.ndarray, what: str) -> tuple[float, float]:
    rel, top1 = compare_f32(ours, theirs)
    assert rel <= F32_REL_TOL, f"{what}: max |dlogit| / max|logit| = {rel:.3e} > {F32_REL_TOL:g}"
    assert top1 >= F32_MIN_TOP1, f"{what}: top-1 agreement {top1:.1%} < {F32_MIN_TOP1:.0%}"
    return rel, top1


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    config, linear_class, embed_dtype = CASES[request.param]
    weights = random_weights(config, seed=1, embed_dtype=embed_dtype)
    path = save_hf(tmp_path_factory.mktemp(request.param), config, weights, linear_class=linear_class,
                   float_dtype=embed_dtype)
    hf = _load_transformers(path)
    assert hf.dtype == torch.float32 and hf.lm_head.weight.dtype == torch.float32
    return {"name": request.param, "config": config, "path": path, "hf": hf, "ours": pybitnet.load(path),
            "ref": reference_numpy.ReferenceModel.from_hf_dir(path)}


def _report(record_property, what: str, figures: dict[str, tuple[float, float]]) -> None:
    line = ", ".join(f"{k}: max rel {rel:.2e} top-1 {top1:.1%}" for k, (rel, top1) in figures.items())
    print(f"\n[transformers xval] {what}: {line}")
    for k, (rel, top1) in figures.items():
        record_property(f"{what} {k} max_rel", rel)
        record_property(f"{what} {k} top1", top1)


def test_single_sequence_matches_transformers(case, record_property):
    config = case["config"]
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, config.vocab_size, (1, SEQ), generator=gen)
    hf = _hf_logits(case["hf"], tokens)[0]  # (T, V)
    ours = case["ours"].forward_full(tokens)[0].double().numpy()
    ref = case["ref"].forward(tokens[0].tolist())
    figures = {
        "ours-vs-hf": assert_f32_rule(ours, hf, "pybitnet fp32 vs transformers fp32"),
        "hf-vs-f64ref": assert_f32_rule(hf, ref, "transformers fp32 vs numpy float64"),
        "ours-vs-f64ref": assert_f32_rule(ours, ref, "pybitnet fp32 vs numpy float64"),
    }
    _report(record_property, f"{case['name']} B=1 T={SEQ}", figures)


def test_ragged_batch_matches_transformers(case, record_property):
    """Right-padded batch; transformers gets the attention_mask; only real positions are compared."""
    config = case["config"]
    gen = torch.Generator().manual_seed(9)
    lengths = [SEQ, 13, 31]
    tokens = torch.randint(0, config.vocab_size, (len(lengths), SEQ), generator=gen)  # padding = random ids
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    hf = _hf_logits(case["hf"], tokens, mask)
    ours = case["ours"].forward_full(tokens, attention_mask=mask).double().numpy()
    real = mask.bool().numpy()
    figures = {"ours-vs-hf": assert_f32_rule(ours[real], hf[real], "ragged batch, pybitnet vs transformers")}
    for b, n in enumerate(lengths):  # and each row against the reference run on that row alone
        assert_f32_rule(ours[b, :n], case["ref"].forward(tokens[b, :n].tolist()), f"ragged row {b} vs numpy float64")
    _report(record_property, f"{case['name']} B=3 ragged {lengths}", figures)


def test_default_writer_output_runs_in_transformers(tmp_path):
    """All writer defaults, loaded as a user of microsoft/bitnet-b1.58-2B-4T would: from_pretrained(dir)."""
    config = CASES["relu2-autobitlinear-tied"][0]
    path = save_hf(tmp_path / "defaults", config, random_weights(config, seed=2))
    tokens = torch.randint(0, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(3))
    hf = _hf_logits(_load_transformers(path, dtype=None), tokens)[0]  # bf16 compute
    ours = pybitnet.load(path).forward_full(tokens)[0].double().numpy()
    assert np.isfinite(hf).all()
    # bf16 activations in transformers: a loose sanity bound (measured 94-100% on all-bf16 files)
    assert compare_f32(ours, hf)[1] >= 0.75
