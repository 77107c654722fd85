"""Scoring and perplexity against a direct computation from full logits."""

from __future__ import annotations

import math

import pytest
import torch

from pybitnet import InputError, evaluate, synthetic


@pytest.fixture(scope="module")
def model():
    return synthetic.random_model("tiny", seed=4, dtype=torch.float64)


def _direct_logprobs(model, tokens):
    logits = model.forward_full(torch.tensor(tokens)[None])[0]  # (T, V)
    logp = logits.log_softmax(-1)
    return torch.tensor([float(logp[t, tokens[t + 1]]) for t in range(len(tokens) - 1)], dtype=torch.float64)


def test_token_logprobs_match_full_logits(model, monkeypatch):
    tokens = torch.randint(0, 512, (70,)).tolist()
    monkeypatch.setattr(evaluate, "PROJECT_ROWS", 16)  # several projection slices
    got = evaluate.token_logprobs(model, tokens, chunk_size=25)  # several prefill chunks
    assert torch.allclose(got, _direct_logprobs(model, tokens), rtol=1e-9, atol=1e-9)


def test_perplexity_with_one_window_is_exp_mean_nll(model):
    tokens = torch.randint(0, 512, (40,)).tolist()
    result = evaluate.perplexity(model, tokens, ctx=64)
    nll = -float(_direct_logprobs(model, tokens).mean())
    assert result.tokens_scored == 39 and result.windows == 1
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-9)


def test_strided_windows_score_each_token_once_with_its_window_context(model):
    tokens = torch.randint(0, 512, (50,)).tolist()
    result = evaluate.perplexity(model, tokens, ctx=20, stride=10)
    # worked out by hand: windows [0,20) [10,30) [20,40) [30,50); the first scores tokens 1..19,
    # each later one only its last 10 tokens, with the window's earlier tokens as context
    expected = list(_direct_logprobs(model, tokens[0:20]))
    for begin in (10, 20, 30):
        expected += list(_direct_logprobs(model, tokens[begin : begin + 20])[-10:])
    assert result.tokens_scored == 49 and result.windows == 4
    assert result.nll == pytest.approx(-sum(expected) / 49, rel=1e-9)


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
