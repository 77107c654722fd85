"""Attention and prefill do not depend on how a sequence is split into calls: on the native float32 path a
prompt prefilled in one pass, in two pieces split at any position, or one token at a time gives the same
logits and the same cache, bit for bit, on every instruction set; without the native kernels the float32
rule holds."""

from __future__ import annotations

import pytest
import torch

from pybitnet import Transformer, native, synthetic
from pybitnet.config import preset

ops = native.ops()
needs_native = pytest.mark.skipif(ops is None, reason="native kernels not built (no compiler or PYBITNET_NATIVE=0)")


def _isas() -> list[str]:
    features = int(ops.cpu_features())
    return ["scalar"] + (["avx2"] if features & native.HAS_AVX2 else []) + \
        (["avx512"] if features & native.HAS_AVX512_VNNI else [])


def _model(num_heads: int, num_kv_heads: int, head_dim: int, seed: int = 3) -> Transformer:
    """A 2-layer relu² model; 8 query heads over 2 kv heads of dim 16 run the AVX-512 tiles of 4 keys x 4 heads."""
    config = preset("tiny").replace(num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=num_heads * head_dim,
                                    intermediate_size=96, vocab_size=300, max_position_embeddings=128)
    return Transformer(config, synthetic.random_weights(config, seed))


def _prompt(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))  # (1, T)


def _split_prefill(model: Transformer, tokens: torch.Tensor, cuts: list[int]):
    """Logits (T, V) of every position and the cache, prefilling tokens in pieces that end at `cuts`."""
    cache = model.new_cache(1, tokens.shape[1])
    pieces, start = [], 0
    for end in [*cuts, tokens.shape[1]]:
        pieces.append(model.prefill(tokens[:, start:end], cache, logits="all")[0])
        start = end
    return torch.cat(pieces), cache


@needs_native
@pytest.mark.parametrize("heads", [(8, 2, 16), (4, 2, 12), (6, 3, 8)])
def test_every_split_gives_the_bits_of_one_pass(heads, monkeypatch, one_thread):
    model = _model(*heads)
    tokens = _prompt(37, model.config.vocab_size)
    for isa in _isas():
        monkeypatch.setenv("PYBITNET_NATIVE_ISA", isa)
        whole, cache = _split_prefill(model, tokens, [])
        assert torch.equal(model.forward_full(tokens)[0], whole), isa  # no cache kept: the same bits
        for cut in range(1, tokens.shape[1]):
            logits, split_cache = _split_prefill(model, tokens, [cut])
            assert torch.equal(logits, whole), f"{isa}: split at {cut}"
            assert torch.equal(split_cache.keys, cache.keys) and torch.equal(split_cache.values, cache.values), \
                f"{isa}: cache after a split at {cut}"
        steps = model.forward_step_by_step(tokens)[0]  # one token at a time: the decode path
        assert torch.equal(steps, whole), isa
        ragged, _ = _split_prefill(model, tokens, [5, 6, 19, 33])
        assert torch.equal(ragged, whole), isa


@needs_native
def test_two_threads_and_one_agree(one_thread):
    model = _model(8, 2, 16)
    tokens = _prompt(50, model.config.vocab_size, seed=1)
    one, _ = _split_prefill(model, tokens, [17])
    torch.set_num_threads(2)
    two, _ = _split_prefill(model, tokens, [])
    assert torch.equal(one, two)


@needs_native
def test_ragged_rows_after_a_cached_prefix(one_thread):
    """Rows at different cache lengths prefill together (per-row RoPE and starts): each row's logits equal a
    solo one-pass prefill of its whole sequence."""
    model = _model(8, 2, 16)
    first = [_prompt(n, model.config.vocab_size, seed=n) for n in (9, 20)]
    rest = _prompt(6, model.config.vocab_size, seed=99)
    cache = model.new_cache(2, 40)
    for row, prefix in enumerate(first):  # each row holds its own prefix
        solo = model.new_cache(1, 40)
        model.prefill(prefix, solo)
        cache.copy_rows(solo, [0], [row])
    both = model.prefill(rest.expand(2, -1), cache, logits="all")  # (2, 6, V)
    for row, prefix in enumerate(first):
        whole, _ = _split_prefill(model, torch.cat([prefix, rest], 1), [])
        assert torch.equal(both[row], whole[prefix.shape[1]:]), row


def test_without_native_kernels_splits_meet_the_float32_rule(one_thread, monkeypatch):
    """The pure-PyTorch path sums attention in an order that depends on the call's span: the float32 rule."""
    monkeypatch.setattr(native, "ops", lambda: None)
    model = _model(8, 2, 16)
    tokens = _prompt(37, model.config.vocab_size)
    whole, _ = _split_prefill(model, tokens, [])
    for cut in (1, 12, 36):
        logits, _ = _split_prefill(model, tokens, [cut])
        rel = float(((logits - whole).abs().max() / whole.abs().max()))
        assert rel <= 5e-2, cut
        assert float((logits.argmax(-1) == whole.argmax(-1)).float().mean()) >= 0.9, cut
