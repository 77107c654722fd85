"""Sampling: validation, greedy, seeded determinism, distributions, and filters against transformers' processors."""

from __future__ import annotations

import math

import pytest
import torch

from pybitnet.errors import InputError
from pybitnet.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    mark_seen,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
LOGITS = PROBS.log().unsqueeze(0)  # (1, 4)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -0.1, "temperature must be >= 0"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("temperature", "hot", "temperature must be a finite number"),
        ("top_k", -1, "top_k must be an integer >= 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("top_p", 0.0, "top_p must be in"),
        ("top_p", 1.5, "top_p must be in"),
        ("min_p", 1.0, "min_p must be in"),
        ("min_p", -0.2, "min_p must be in"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number"),
    ],
)
def test_invalid_values_raise_input_error(field, value, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**{field: value})


def test_invalid_seed_and_missing_generator():
    with pytest.raises(InputError, match="seed"):
        make_generator(-3)
    with pytest.raises(InputError, match="Generator"):
        sample(LOGITS, SamplingParams(temperature=1.0))
    with pytest.raises(InputError, match="shape"):
        sample(LOGITS[0], SamplingParams())
    with pytest.raises(InputError, match="seen"):
        sample(LOGITS, SamplingParams(repetition_penalty=1.2))


def test_greedy_is_argmax_and_uses_no_randomness():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    generator = make_generator(7)
    state = generator.get_state()
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0), generator), logits.argmax(-1))
    assert torch.equal(generator.get_state(), state)
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert sample(tied, SamplingParams()).item() == 1  # lowest id on ties


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(4, 1000)  # uniform: every draw is pure RNG
    params = SamplingParams(temperature=1.0)
    first = [sample(logits, params, g).tolist() for g in [make_generator(123)] for _ in range(5)]
    again = [sample(logits, params, g).tolist() for g in [make_generator(123)] for _ in range(5)]
    other = [sample(logits, params, g).tolist() for g in [make_generator(124)] for _ in range(5)]
    assert first == again and first != other


def _frequencies(logits: torch.Tensor, params: SamplingParams, draws: int = 40000) -> torch.Tensor:
    batch = logits.expand(draws, -1).contiguous()  # one row per draw: one multinomial call
    tokens = sample(batch, params, make_generator(0))
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / draws


def _assert_close_distribution(observed: torch.Tensor, expected: torch.Tensor, draws: int = 40000):
    # 5 standard errors of a binomial proportion: a real bug moves a frequency by far more.
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-9
    assert torch.all((observed - expected).abs() <= tolerance), (observed, expected)


def test_temperature_samples_softmax_of_scaled_logits():
    for temperature in (1.0, 0.5, 2.0):
        expected = torch.softmax(LOGITS[0] / temperature, -1)
        _assert_close_distribution(_frequencies(LOGITS, SamplingParams(temperature=temperature)), expected)


def test_top_k_top_p_min_p_keep_the_right_tokens():
    renorm = lambda keep: PROBS * torch.tensor(keep, dtype=torch.float64) / (PROBS * torch.tensor(keep)).sum()
    cases = [
        (SamplingParams(temperature=1.0, top_k=2), [1, 1, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.79), [1, 1, 0, 0]),  # 0.5 + 0.3 reaches 0.79
        (SamplingParams(temperature=1.0, top_p=0.81), [1, 1, 1, 0]),
        (SamplingParams(temperature=1.0, top_p=0.3), [1, 0, 0, 0]),  # the top token always stays
        (SamplingParams(temperature=1.0, min_p=0.2), [1, 1, 1, 0]),  # threshold 0.1
        (SamplingParams(temperature=1.0, min_p=0.7), [1, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.8), [1, 1, 0, 0]),  # top-p on the top-k renormalised:
        # (0.5 + 0.3) / 0.95 = 0.84 reaches 0.8, while without top-k 0.8 would sit on the float boundary
    ]
    for params, keep in cases:
        _assert_close_distribution(_frequencies(LOGITS, params), renorm(keep))


def test_filters_agree_with_transformers_processors():
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    scores = torch.randn(8, 300, generator=torch.Generator().manual_seed(3)) * 3
    input_ids = torch.randint(0, 300, (8, 20), generator=torch.Generator().manual_seed(4))
    pairs = [
        (top_k_filter(scores, 17), logits_process.TopKLogitsWarper(17)(input_ids, scores.clone())),
        (top_p_filter(scores, 0.7), logits_process.TopPLogitsWarper(0.7)(input_ids, scores.clone())),
        (min_p_filter(scores, 0.05), logits_process.MinPLogitsWarper(0.05)(input_ids, scores.clone())),
    ]
    for ours, theirs in pairs:
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    seen = mark_seen(torch.zeros(8, 300, dtype=torch.bool), input_ids)
    expected = logits_process.RepetitionPenaltyLogitsProcessor(1.3)(input_ids, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores, seen, 1.3), expected, rtol=0, atol=0)


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5]])
    seen = torch.tensor([[True, False, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.5, -2.0, 0.5]]
    # Greedy with the penalty moves off the repeated token.
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen=seen).item() == 1
    assert sample(logits, SamplingParams()).item() == 0


def test_mark_seen_accepts_steps_and_prompts():
    seen = torch.zeros(2, 6, dtype=torch.bool)
    mark_seen(seen, torch.tensor([[0, 3], [5, 5]]))
    mark_seen(seen, torch.tensor([1, 2]))
    assert seen.nonzero().tolist() == [[0, 0], [0, 1], [0, 3], [1, 2], [1, 5]]


def test_sampled_tokens_are_never_filtered_ones():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.3, top_k=5, top_p=0.9, min_p=0.01)
    allowed = torch.topk(logits, 5, dim=-1).indices
    generator = make_generator(9)
    for _ in range(20):
        tokens = sample(logits, params, generator)
        assert torch.all((allowed == tokens.unsqueeze(-1)).any(-1))
    assert not math.isnan(float(tokens.sum()))


def _filter_chain_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = logits.float() / params.temperature
    return torch.softmax(min_p_filter(top_p_filter(top_k_filter(scaled, params.top_k), params.top_p), params.min_p), -1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.5, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=7),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=5.0, top_p=0.999),  # flat: the top candidates miss the kept set -> full path
    ],
)
def test_candidate_fast_path_is_the_filter_chain_distribution(params):
    from pybitnet.sampling import candidate_distribution

    logits = torch.randn(3, 20000, generator=torch.Generator().manual_seed(8)) * 4
    index, weights = candidate_distribution(logits, params)
    full = torch.zeros(3, 20000).scatter_(1, index, weights)
    full = full / full.sum(-1, keepdim=True)
    torch.testing.assert_close(full, _filter_chain_probs(logits, params), rtol=1e-4, atol=1e-7)


def test_top_k_ties_keep_every_tied_token():
    logits = torch.zeros(1, 100)
    logits[0, :3] = 1.0  # three tied leaders, top_k=2 keeps all three (as transformers' TopKLogitsWarper does)
    drawn = {sample(logits, SamplingParams(temperature=0.1, top_k=2), g).item()
             for g in [make_generator(0)] for _ in range(200)}
    assert drawn == {0, 1, 2}


@pytest.mark.parametrize("temperature", [1e-40, 1e-38, 1e-30, 1e-12])
@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.1)])
def test_tiny_temperature_picks_the_argmax(temperature, top_k, top_p, min_p):
    # logits / temperature overflows float32 for these: the draw must still be the most likely token
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(7)) * 30  # (B, V)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = sample(logits, params, make_generator(0))
    assert torch.equal(got, logits.argmax(-1))
