"""KV cache: allocated once, written in place, overflow is a clear error; chunked prefill is exact."""

from __future__ import annotations

import pytest
import torch

from pybitnet import CacheError, InputError, synthetic
from rules import assert_float32_rule, assert_float64_rule, right_padded_mask


def test_cache_is_written_in_place_never_reallocated():
    model = synthetic.random_model("tiny", seed=0, dtype=torch.float64)
    cache = model.new_cache(2, 16)
    keys_ptr = cache.keys.data_ptr()
    model.prefill(torch.randint(0, 512, (2, 5)), cache)
    for _ in range(4):
        model.decode_step(torch.randint(0, 512, (2,)), cache)
    assert cache.keys.data_ptr() == keys_ptr
    assert cache.lengths.tolist() == [9, 9]
    assert cache.keys.shape[3] == 16
    assert cache.keys[:, :, :, 9:].abs().sum() == 0  # nothing written past the used positions


def test_overflow_is_a_clear_error():
    model = synthetic.random_model("tiny", seed=0)
    cache = model.new_cache(1, 4)
    model.prefill(torch.randint(0, 512, (1, 4)), cache)
    with pytest.raises(CacheError, match="max_len=4"):
        model.decode_step(torch.tensor([1]), cache)
    with pytest.raises(CacheError, match="max_len=4"):
        model.prefill(torch.randint(0, 512, (1, 5)), model.new_cache(1, 4))


def test_select_rows_keeps_decoding_the_kept_rows():
    model = synthetic.random_model("tiny", seed=1, dtype=torch.float64)
    tokens = torch.randint(0, 512, (3, 6))
    cache = model.new_cache(3, 10)
    model.prefill(tokens, cache)
    nxt = torch.randint(0, 512, (3,))
    full = model.decode_step(nxt, cache)
    cache2 = model.new_cache(3, 10)
    model.prefill(tokens, cache2)
    cache2.select_rows(torch.tensor([0, 2]))
    kept = model.decode_step(nxt[[0, 2]], cache2)
    assert_float64_rule(kept, full[[0, 2]])
    with pytest.raises(CacheError):
        cache2.select_rows(torch.tensor([5]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 7, 32, 100])
def test_chunked_forward_full_equals_unchunked(dtype, chunk):
    model = synthetic.random_model("tiny", seed=2, dtype=dtype)
    tokens = torch.randint(0, 512, (2, 100))
    mask = right_padded_mask([100, 61], 100)
    whole = model.forward_full(tokens, attention_mask=mask, chunk_size=1000)
    chunked = model.forward_full(tokens, attention_mask=mask, chunk_size=chunk)
    real = mask.bool()
    (assert_float64_rule if dtype == torch.float64 else assert_float32_rule)(chunked, whole, real)
    last = model.forward_full(tokens, attention_mask=mask, chunk_size=chunk, logits="last")  # (2, V)
    rule = assert_float64_rule if dtype == torch.float64 else assert_float32_rule
    rule(last, torch.stack([whole[0, 99], whole[1, 60]]))


def test_logit_selection():
    model = synthetic.random_model("tiny", seed=3, dtype=torch.float64)
    tokens = torch.randint(0, 512, (2, 9))
    all_logits = model.forward_full(tokens)
    picked = model.forward_full(tokens, logits=torch.tensor([0, 4, 8]))
    assert picked.shape == (2, 3, 512)
    assert torch.allclose(picked, all_logits[:, [0, 4, 8]], rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="logits must be"):
        model.forward_full(tokens, logits="first")


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(1, 0, dtype=torch.long), "empty input"),
    (torch.tensor([[1, 600]]), "token id out of range"),
    (torch.tensor([[1.0, 2.0]]), "integer tensor"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
])
def test_bad_tokens_are_clear_errors(bad, match):
    model = synthetic.random_model("tiny", seed=0)
    with pytest.raises(InputError, match=match):
        model.forward_full(bad)


def test_bad_masks_are_clear_errors():
    model = synthetic.random_model("tiny", seed=0)
    tokens = torch.randint(0, 512, (2, 4))
    with pytest.raises(InputError, match="right-padded"):
        model.forward_full(tokens, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(InputError, match="shape"):
        model.forward_full(tokens, attention_mask=torch.ones(2, 3))
    with pytest.raises(InputError, match="no real tokens"):
        model.forward_full(tokens, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


def test_inference_mode_then_plain_calls_work():
    """Buffers made inside torch.inference_mode (e.g. by generate) must not break later plain calls."""
    model = synthetic.random_model("tiny", seed=0)  # bf16 embedding: the lm_head widens through a buffer
    tokens = torch.randint(0, 512, (1, 5))
    with torch.inference_mode():
        model.forward_step_by_step(tokens)
    logits = model.forward_full(tokens)
    logits /= 2  # user code may modify what it gets back


def test_small_integer_token_dtypes_decode_like_int64():
    model = synthetic.random_model("tiny", seed=0, dtype=torch.float64)
    results = []
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        cache = model.new_cache(2, 4)
        results.append(model.decode_step(torch.tensor([5, 200], dtype=dtype), cache))
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_padding_may_hold_any_id_and_masks_must_be_0_or_1():
    model = synthetic.random_model("tiny", seed=0, dtype=torch.float64)
    tokens = torch.randint(0, 512, (2, 6))
    mask = right_padded_mask([6, 4], 6)
    clean = model.forward_full(tokens, attention_mask=mask)
    tokens[1, 4:] = -100  # the HF ignore id as padding
    assert torch.equal(model.forward_full(tokens, attention_mask=mask)[1, :4], clean[1, :4])
    half = mask.double()
    half[0, 0] = 1.5
    with pytest.raises(InputError, match="only 0 and 1"):
        model.forward_full(tokens, attention_mask=half)


@pytest.mark.parametrize("index,match", [
    (torch.tensor([True, False, True, False, False, False]), "integer tensor"),
    (torch.tensor([1.7]), "integer tensor"),
    (torch.tensor([-15]), r"\[-6, 6\)"),
])
def test_bad_logit_indices_are_clear_errors(index, match):
    model = synthetic.random_model("tiny", seed=0)
    with pytest.raises(InputError, match=match):
        model.forward_full(torch.randint(0, 512, (2, 6)), logits=index)


def test_bad_chunk_size_is_a_clear_error():
    model = synthetic.random_model("tiny", seed=0)
    with pytest.raises(InputError, match="chunk_size"):
        model.forward_full(torch.randint(0, 512, (1, 6)), chunk_size=2.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefill_into_rows_of_different_lengths_continues_each_row(dtype):
    """A cache whose rows hold different lengths takes a block of new tokens per row: each row's
    logits equal running that row's whole sequence alone."""
    model = synthetic.random_model("tiny", seed=4, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    firsts = [torch.randint(0, 512, (1, n), generator=gen) for n in (3, 9, 1)]
    block = torch.randint(0, 512, (3, 5), generator=gen)
    cache = model.new_cache(3, 16)
    for row, first in enumerate(firsts):  # rows filled to lengths 3, 9, 1
        single = model.new_cache(1, 16)
        model.prefill(first, single)
        cache.copy_rows(single, [0], [row])
    assert cache.lengths.tolist() == [3, 9, 1]
    got = model.prefill(block, cache, logits="all")  # (3, 5, V)
    assert cache.lengths.tolist() == [8, 14, 6]
    for row, first in enumerate(firsts):
        alone = model.forward_full(torch.cat([first, block[row : row + 1]], dim=1))[0, -5:]
        (assert_float64_rule if dtype == torch.float64 else assert_float32_rule)(got[row], alone)
