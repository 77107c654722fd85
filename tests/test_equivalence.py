"""forward_full == forward_step_by_step == prefill + decode, on random configs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pybitnet import ModelConfig, synthetic
from pybitnet.model import Transformer
from rules import assert_rule, right_padded_mask

RECORD = os.environ.get("PYBITNET_RECORD")  # a file to append measured figures to (closing notes)


@st.composite
def configs(draw) -> ModelConfig:
    kv_heads = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([16, 32, 48, 64, 96, 128]))
    heads = kv_heads * ratio
    return ModelConfig(
        vocab_size=draw(st.integers(16, 4096)),
        hidden_size=draw(st.sampled_from([32, 64, 96, 128])),
        intermediate_size=draw(st.sampled_from([48, 64, 160])),
        num_layers=draw(st.integers(1, 2)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=draw(st.sampled_from(["relu2", "silu"])),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        tie_word_embeddings=draw(st.booleans()),
    )


def _record(kind: str, dtype, rel: float, agree: float) -> None:
    if RECORD:
        with open(RECORD, "a") as f:
            f.write(json.dumps({"check": kind, "dtype": str(dtype), "max_rel": rel, "top1": agree}) + "\n")


def _model(config: ModelConfig, seed: int, dtype: torch.dtype) -> Transformer:
    return Transformer(config, synthetic.random_weights(config, seed, embed_dtype=torch.float32), dtype=dtype)


def _batch(config, seq, batch, data):
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=batch * seq,
                                             max_size=batch * seq))).view(batch, seq)
    lengths = [seq] + [data.draw(st.integers(1, seq)) for _ in range(batch - 1)]
    return tokens, lengths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=configs(), seq=st.sampled_from([1, 2, 7, 64, 300]), batch=st.sampled_from([1, 3]),
       chunk=st.sampled_from([None, 5, 48]), seed=st.integers(0, 2**16), data=st.data())
def test_full_matches_step_by_step(dtype, config, seq, batch, chunk, seed, data):
    """Also through chunked prefill: `chunk` tokens at a time through a temporary cache."""
    model = _model(config, seed, dtype)
    tokens, lengths = _batch(config, seq, batch, data)
    mask = right_padded_mask(lengths, seq)
    full = model.forward_full(tokens, attention_mask=mask, chunk_size=chunk)
    step = model.forward_step_by_step(tokens, attention_mask=mask)
    assert full.shape == step.shape == (batch, seq, config.vocab_size)
    _record("full_vs_step", dtype, *assert_rule(dtype, full, step, mask.bool()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=configs(), seq=st.sampled_from([2, 7, 64]), split=st.integers(1, 6), seed=st.integers(0, 2**16),
       data=st.data())
def test_prefill_then_decode_matches_step_by_step(dtype, config, seq, split, seed, data):
    model = _model(config, seed, dtype)
    tokens, _ = _batch(config, seq, 2, data)
    t1 = min(split, seq - 1)
    step = model.forward_step_by_step(tokens)
    cache = model.new_cache(2, seq)
    first = model.prefill(tokens[:, :t1], cache, logits="all")
    rest = torch.stack([model.decode_step(tokens[:, t], cache) for t in range(t1, seq)], dim=1)
    _record("prefill_decode", dtype, *assert_rule(dtype, torch.cat([first, rest], dim=1), step))
    assert cache.lengths.tolist() == [seq, seq]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=configs(), seq=st.sampled_from([7, 64]), seed=st.integers(0, 2**16), data=st.data())
def test_padded_row_matches_row_alone(dtype, config, seq, seed, data):
    model = _model(config, seed, dtype)
    tokens, lengths = _batch(config, seq, 3, data)
    tokens[1:, :] = torch.randint(0, config.vocab_size, (2, seq))  # padding holds arbitrary ids
    mask = right_padded_mask(lengths, seq)
    batched = model.forward_full(tokens, attention_mask=mask)
    for row, n in enumerate(lengths):
        alone = model.forward_full(tokens[row : row + 1, :n])
        _record("padded_vs_alone", dtype, *assert_rule(dtype, batched[row : row + 1, :n], alone))


def test_padding_values_do_not_influence_real_positions():
    model = _model(ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2,
                               num_heads=4, num_kv_heads=2), 3, torch.float64)
    tokens = torch.randint(0, 100, (2, 12))
    mask = right_padded_mask([12, 5], 12)
    a = model.forward_full(tokens, attention_mask=mask)
    tokens[1, 5:] = torch.randint(0, 100, (7,))
    b = model.forward_full(tokens, attention_mask=mask)
    assert torch.equal(a[1, :5], b[1, :5])


def test_ragged_prefill_then_decode_continues_each_row():
    """After a ragged prefill every row decodes at its own position, like the row run alone."""
    config = ModelConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=1)
    model = _model(config, 7, torch.float64)
    tokens = torch.randint(0, 200, (3, 10))
    lengths = [10, 4, 7]
    cache = model.new_cache(3, 16)
    last = model.prefill(tokens, cache, attention_mask=right_padded_mask(lengths, 10))
    assert cache.lengths.tolist() == lengths
    nxt = torch.randint(0, 200, (3,))
    stepped = model.decode_step(nxt, cache)
    for row, n in enumerate(lengths):
        alone = model.forward_step_by_step(torch.cat([tokens[row, :n], nxt[row : row + 1]])[None])
        assert_rule(torch.float64, last[row], alone[0, n - 1])
        assert_rule(torch.float64, stepped[row], alone[0, n])
