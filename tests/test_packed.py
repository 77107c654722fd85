"""The packed 2-bit layout: hand-checked bit positions, round trips, and loaders that keep only packed weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pybitnet import synthetic
from pybitnet.errors import CheckpointError
from pybitnet.layers import BitLinear
from pybitnet.loaders import load
from pybitnet.loaders.gguf import write_gguf
from pybitnet.quant.packed import pack_ternary, packed_columns, unpack_ternary
from pybitnet.weights import TernaryWeight


def _ternary(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


def test_bit_positions_by_hand():
    """Weight (0, 256b + 64s + j) sits in byte 64b + j, bits 2s..2s+1, as w + 1; padding is code 1."""
    values = torch.zeros(1, 300, dtype=torch.int8)
    values[0, 5] = -1  # b=0, s=0, j=5 -> byte 5 low bits 00 (code 0)
    values[0, 64 + 7] = 1  # b=0, s=1, j=7 -> byte 7 bits 3..2 = 10 (code 2)
    values[0, 256 + 3] = 1  # b=1, s=0, j=3 -> byte 67 bits 1..0 = 10
    packed = pack_ternary(values)
    assert packed.shape == (1, 128) and packed.dtype == torch.uint8
    zero = 0b01010101  # four zero weights: code 1 in every pair
    assert int(packed[0, 5]) == 0b01010100
    assert int(packed[0, 7]) == 0b01011001
    assert int(packed[0, 67]) == 0b01010110
    assert int(packed[0, 0]) == zero and int(packed[0, 127]) == zero  # 300..511 are padding


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 9), k=st.integers(1, 700), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, seed):
    values = _ternary(n, k, seed)
    packed = pack_ternary(values)
    assert packed.shape == (n, packed_columns(k))
    unpacked = unpack_ternary(packed, k)
    assert torch.equal(unpacked[:, :k], values)
    assert not unpacked[:, k:].any()
    buffer = torch.full((n * packed_columns(k) * 4 + 17,), 9, dtype=torch.int8)
    assert torch.equal(unpack_ternary(packed, k, out=buffer[: n * packed_columns(k) * 4]), unpacked)


def test_unpack_rejects_a_wrong_width():
    packed = pack_ternary(_ternary(2, 256, 0))
    with pytest.raises(CheckpointError, match="64 bytes per row, expected 128"):
        unpack_ternary(packed, 300)


def test_ternary_weight_forms_agree():
    values = _ternary(5, 300, 1)
    plain = TernaryWeight(values, 0.5)
    packed = plain.packed_form()
    assert packed.is_packed and not plain.is_packed and packed.shape == (5, 300)
    assert torch.equal(packed.values, values) and packed.beta == 0.5
    assert packed.with_beta(2.0).is_packed and packed.with_beta(2.0).beta == 2.0
    with pytest.raises(ValueError):
        TernaryWeight(values, 1.0, packed=packed.packed, in_features=300)


def test_bitlinear_keeps_only_packed_weights_on_cpu():
    parts = [TernaryWeight(_ternary(96, 300, 1), 0.02), TernaryWeight(_ternary(32, 300, 2), 0.03).packed_form()]
    layer = BitLinear(parts)
    buffers = dict(layer.named_buffers())
    assert list(buffers) == ["ternary_weights"]
    assert buffers["ternary_weights"].dtype == torch.uint8 and buffers["ternary_weights"].shape == (128, 128)
    assert torch.equal(layer.part(0).values, parts[0].values) and torch.equal(layer.part(1).values, parts[1].values)
    assert layer.part(1).beta == 0.03


@pytest.mark.parametrize("qtype", ["i2_s", "tq2_0", "tq1_0"])
def test_gguf_loaders_hand_over_packed_weights(tmp_path, qtype):
    """Each ternary tensor is packed as it is decoded, and the built model holds the same values."""
    from pybitnet.loaders.gguf import load_gguf_weights

    model = synthetic.random_model("small", seed=3, num_layers=1)  # rows of 256 and 768: TQ blocks fit
    path = tmp_path / f"m.{qtype}.gguf"
    write_gguf(path, model.config, model.export_weights(), qtype=qtype)
    _, weights = load_gguf_weights(path)[:2]
    ternary = [w for w in weights.values() if isinstance(w, TernaryWeight)]
    assert ternary and all(w.is_packed for w in ternary)
    loaded = load(path)
    for a, b in zip(loaded.modules(), model.modules()):
        if isinstance(a, BitLinear):
            assert a.ternary_weights.dtype == torch.uint8
            assert torch.equal(a.ternary_weights, b.ternary_weights)
