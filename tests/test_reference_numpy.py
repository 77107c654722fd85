"""pybitnet's float64 path against an independent plain-numpy forward (tests/reference_numpy.py).

Each case writes a random tiny checkpoint with our HF writer; pybitnet loads it as a user would
(`pybitnet.load(dir, dtype=float64)`) and the numpy reference reads the same files by itself.
float64 rule (docs/exactness.md): max |dlogit| <= 1e-9 * max|logit| and the same argmax at every position.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pybitnet
from pybitnet.config import ModelConfig
from pybitnet.loaders.hf import save_hf
from pybitnet.synthetic import random_weights

_HERE = Path(__file__).resolve().parent


import reference_numpy  # tests/ is on sys.path: pytest's default import mode puts it there

F64_REL_TOL = 1e-9


def _config(*, act="relu2", tie=True, heads=4, kv_heads=2, hidden=64, head_dim=0, inter=96, layers=2,
            vocab=300, theta=10000.0) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, hidden_act=act,
                       rope_theta=theta, rms_norm_eps=1e-5, max_position_embeddings=256,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_ids=(2,))


# (id, config, linear_class): relu2/silu, tied/untied, GQA ratios 1/2/4, both scale conventions
CASES = [
    ("relu2-tied-gqa2-auto", _config(), "autobitlinear"),
    ("silu-tied-gqa1-bitlinear", _config(act="silu", heads=4, kv_heads=4), "bitlinear"),
    ("relu2-untied-gqa4-auto", _config(tie=False, heads=8, kv_heads=2, theta=500000.0), "autobitlinear"),
    ("silu-untied-gqa4-bitlinear", _config(act="silu", tie=False, heads=4, kv_heads=1), "bitlinear"),
    # head_dim not hidden/heads (q width 96 != hidden 64), odd vocab, 3 layers
    ("relu2-headdim24-bitlinear", _config(heads=4, kv_heads=2, head_dim=24, layers=3, vocab=257), "bitlinear"),
]


def _write(tmp_path: Path, config: ModelConfig, linear_class: str, seed: int = 0) -> Path:
    weights = random_weights(config, seed)
    return save_hf(tmp_path / "ckpt", config, weights, linear_class=linear_class, float_dtype=torch.float32)


def _tokens(config: ModelConfig, seq: int, seed: int) -> list[int]:
    gen = np.random.default_rng(seed)
    return [int(t) for t in gen.integers(0, config.vocab_size, size=seq)]


def assert_float64_rule(ours: np.ndarray, ref: np.ndarray, what: str) -> float:
    """max |d| <= 1e-9 * max|ref| and argmax identical at every position; returns the relative diff."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert rel <= F64_REL_TOL, f"{what}: max |dlogit| / max|logit| = {rel:.3e} > {F64_REL_TOL:g}"
    bad = np.nonzero(ours.argmax(-1) != ref.argmax(-1))[0]
    assert bad.size == 0, f"{what}: argmax differs at positions {bad.tolist()}"
    return rel


@pytest.mark.parametrize("config, linear_class", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_float64_full_and_step_match_numpy_reference(tmp_path, config, linear_class):
    path = _write(tmp_path, config, linear_class, seed=len(linear_class) + config.num_kv_heads)
    ref_model = reference_numpy.ReferenceModel.from_hf_dir(path)
    model = pybitnet.load(path, dtype=torch.float64)
    tokens = _tokens(config, 23, seed=config.num_heads)
    ref = ref_model.forward(tokens)  # (T, V)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0.1  # logits spread over units, not ~0

    full = model.forward_full(torch.tensor([tokens]))[0].numpy()
    step = model.forward_step_by_step(torch.tensor([tokens]))[0].numpy()
    rel_full = assert_float64_rule(full, ref, "forward_full vs numpy")
    rel_step = assert_float64_rule(step, ref, "forward_step_by_step vs numpy")
    print(f"\n[float64 vs numpy] {config.hidden_act} tie={config.tie_word_embeddings} "
          f"heads={config.num_heads}/{config.num_kv_heads} {linear_class}: "
          f"full {rel_full:.2e}, step {rel_step:.2e}")


def test_float64_ragged_batch_matches_numpy_per_row(tmp_path):
    """Right-padded rows of a batch, each against the reference run on that row alone."""
    config = _config(heads=4, kv_heads=1)
    path = _write(tmp_path, config, "autobitlinear", seed=7)
    ref_model = reference_numpy.ReferenceModel.from_hf_dir(path)
    model = pybitnet.load(path, dtype=torch.float64)
    lengths = [17, 5, 11]
    seq = max(lengths)
    tokens = torch.zeros(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    rows = []
    for b, n in enumerate(lengths):
        row = _tokens(config, n, seed=100 + b)
        rows.append(row)
        tokens[b, :n] = torch.tensor(row)
        tokens[b, n:] = 3  # padding holds real ids: it must not matter
        mask[b, :n] = 1
    full = model.forward_full(tokens, attention_mask=mask).numpy()
    step = model.forward_step_by_step(tokens, attention_mask=mask).numpy()
    for b, n in enumerate(lengths):
        ref = ref_model.forward(rows[b])
        assert_float64_rule(full[b, :n], ref, f"forward_full row {b}")
        assert_float64_rule(step[b, :n], ref, f"forward_step_by_step row {b}")


def test_scale_conventions_agree(tmp_path):
    """The same weights written as autobitlinear (multiply) and bitlinear (inverse) are the same model,
    for the reference and for pybitnet; a scale read with the wrong convention would not be."""
    config = _config(act="silu")
    weights = random_weights(config, 3)
    auto = save_hf(tmp_path / "auto", config, weights, linear_class="autobitlinear", float_dtype=torch.float32)
    inv = save_hf(tmp_path / "inv", config, weights, linear_class="bitlinear", float_dtype=torch.float32)
    tokens = _tokens(config, 9, seed=5)
    ref_auto = reference_numpy.ReferenceModel.from_hf_dir(auto).forward(tokens)
    ref_inv = reference_numpy.ReferenceModel.from_hf_dir(inv).forward(tokens)
    # the inverse scale is stored as float32(1/beta), so the two files differ by float32 rounding of β
    assert np.abs(ref_auto - ref_inv).max() <= 1e-5 * np.abs(ref_auto).max()
    assert (ref_auto.argmax(-1) == ref_inv.argmax(-1)).all()
    wrong = reference_numpy.ReferenceModel.from_hf_dir(inv)
    for layer in wrong.layers:  # read the bitlinear file as if it were autobitlinear
        for name in reference_numpy.PROJECTIONS:
            layer[name].multiply = True
    assert np.abs(wrong.forward(tokens) - ref_inv).max() > 1e-2 * np.abs(ref_inv).max()


def test_reference_unpack_matches_transformers_docstring_example():
    """The packed example worked out in transformers' integrations/bitnet.py `unpack_weights` docstring."""
    packed = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=np.uint8)
    expected = np.array([[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=np.float64)
    np.testing.assert_array_equal(reference_numpy.unpack_hf_ternary(packed, 8), expected)


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 13), in_features=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_writer_packing_matches_reference_unpack(out_features, in_features, seed):
    """pybitnet's packer (used by save_hf) against the reference's own A.5 unpacker, odd row counts included."""
    from pybitnet.quant.hf_pack import pack_hf

    values = np.random.default_rng(seed).integers(-1, 2, size=(out_features, in_features))
    packed = pack_hf(torch.tensor(values, dtype=torch.int8)).numpy()
    assert packed.shape == (-(-out_features // 4), in_features)
    np.testing.assert_array_equal(reference_numpy.unpack_hf_ternary(packed, out_features), values)


def test_reference_reads_bf16_checkpoints(tmp_path):
    """The default writer dtype (bf16 embedding) is read by the reference's own BF16 widening."""
    config = _config(vocab=64, layers=1)
    weights = random_weights(config, 11)  # bf16 embedding
    path = save_hf(tmp_path / "bf16", config, weights)  # float_dtype defaults to bfloat16
    tokens = _tokens(config, 6, seed=2)
    ref = reference_numpy.ReferenceModel.from_hf_dir(path)
    np.testing.assert_array_equal(ref.embed, weights["embed_tokens"].double().numpy())
    logits = pybitnet.load(path, dtype=torch.float64).forward_full(torch.tensor([tokens]))[0].numpy()
    assert_float64_rule(logits, ref.forward(tokens), "bf16-embedding checkpoint")


def test_reference_is_independent_of_pybitnet_and_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import reference_numpy; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'pybitnet', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(_HERE)], check=True)
