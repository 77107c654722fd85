"""Scoring and perplexity against a direct computation from full logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pybitnet import InputError, evaluate, synthetic


@pytest.fixture(scope="module")
def model():
    return synthetic.random_model("tiny", seed=4, dtype=torch.float64)


def _direct_logprobs(model, tokens):
    logits = model.forward_full(torch.tensor(tokens)[None])[0]  # (T, V)
    logp = logits.log_softmax(-1)
    return torch.tensor([float(logp[t, tokens[t + 1]]) for t in range(len(tokens) - 1)], dtype=torch.float64)


def test_token_logprobs_match_full_logits(model, monkeypatch):
    tokens = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setattr(evaluate, "PROJECT_ROWS", 16)  # several projection slices
    got = evaluate.token_logprobs(model, tokens, chunk_size=25)  # several prefill chunks
    assert torch.allclose(got, _direct_logprobs(model, tokens), rtol=1e-9, atol=1e-9)


def test_perplexity_with_one_window_is_exp_mean_nll(model):
    tokens = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    result = evaluate.perplexity(model, tokens, ctx=64)
    nll = -float(_direct_logprobs(model, tokens).mean())
    assert result.tokens_scored == 39 and result.windows == 1
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-9)


def test_strided_windows_score_each_token_once_with_its_window_context(model):
    tokens = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    result = evaluate.perplexity(model, tokens, ctx=20, stride=10)
    # worked out by hand: windows [0,20) [10,30) [20,40) [30,50); the first scores tokens 1..19,
    # each later one only its last 10 tokens, with the window's earlier tokens as context
    expected = [float(x) for x in _direct_logprobs(model, tokens[0:20])]
    for begin in (10, 20, 30):
        expected += [float(x) for x in _direct_logprobs(model, tokens[begin : begin + 20])[-10:]]
    assert result.tokens_scored == 49 and result.windows == 4
    assert result.nll == pytest.approx(-sum(expected) / 49, rel=1e-9)


@pytest.mark.parametrize("length,ctx,stride", [(9, 8, 8), (2049, 2048, 2048), (12, 4, 4), (7, 2, 1)])
def test_every_token_but_the_first_is_scored_once(length, ctx, stride):
    windows = evaluate.perplexity_windows(length, ctx, stride)
    targets = [t for _, first, end in windows for t in range(first, end)]
    assert targets == list(range(1, length))
    assert all(0 <= begin < first and end - begin <= ctx for begin, first, end in windows)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(length=st.integers(2, 40), ctx=st.integers(2, 24), data=st.data())
def test_windows_partition_the_targets_with_enough_context(length, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    windows = evaluate.perplexity_windows(length, ctx, stride)
    targets = [t for _, first, end in windows for t in range(first, end)]
    assert targets == list(range(1, length))  # each predictable token once, in order
    for begin, first, end in windows:
        assert end - begin <= ctx
        for target in range(first, end):  # context of target: tokens[begin:target]
            assert target - begin >= min(target, ctx - min(stride, ctx - 1))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(length=st.integers(2, 30), ctx=st.integers(2, 20), data=st.data())
def test_perplexity_is_the_mean_of_direct_logprobs_over_its_windows(model, length, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    tokens = data.draw(st.lists(st.integers(0, 511), min_size=length, max_size=length))
    result = evaluate.perplexity(model, tokens, ctx=ctx, stride=stride)
    # independent: one forward_full + log_softmax per target over exactly the tokens it may see
    nll = 0.0
    for begin, first, end in evaluate.perplexity_windows(length, ctx, stride):
        direct = _direct_logprobs(model, tokens[begin:end])
        nll -= sum(float(direct[t - begin - 1]) for t in range(first, end))
    assert result.tokens_scored == length - 1
    assert result.nll == pytest.approx(nll / (length - 1), rel=1e-9, abs=1e-12)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(tokens=st.lists(st.integers(0, 511), min_size=2, max_size=30), extra_ctx=st.integers(0, 8),
       data=st.data())
def test_perplexity_equals_one_long_pass_when_the_text_fits(model, tokens, extra_ctx, data):
    ctx = len(tokens) + extra_ctx
    stride = data.draw(st.integers(1, ctx))
    result = evaluate.perplexity(model, tokens, ctx=max(ctx, 2), stride=stride)
    nll = -float(_direct_logprobs(model, tokens).mean())
    assert result.tokens_scored == len(tokens) - 1 and result.windows == 1
    assert result.nll == pytest.approx(nll, rel=1e-9, abs=1e-12)


def test_bad_inputs(model):
    with pytest.raises(InputError, match="at least 2 tokens"):
        evaluate.token_logprobs(model, [5])
    with pytest.raises(InputError, match="stride"):
        evaluate.perplexity(model, [1, 2, 3], ctx=8, stride=9)


def test_scoring_takes_one_integer_sequence(model):
    with pytest.raises(InputError, match="one sequence"):
        evaluate.token_logprobs(model, torch.randint(0, 512, (2, 5)))
    with pytest.raises(InputError, match="integers"):
        evaluate.token_logprobs(model, torch.tensor([3.9, 7.2, 8.8]))
    row = torch.randint(0, 512, (1, 7))
    assert torch.equal(evaluate.token_logprobs(model, row), evaluate.token_logprobs(model, row[0]))
