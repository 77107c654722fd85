"""I2_S, TQ2_0 and TQ1_0: hand-built blocks decoded to values worked out here, encoder round trips,
and (for the TQ types) byte-for-byte agreement with gguf-py's reference quantizer/dequantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pybitnet.errors import GGUFError
from pybitnet.quant.i2s import decode_i2s, encode_i2s
from pybitnet.quant.tq import decode_tq1_0, decode_tq2_0, encode_tq1_0, encode_tq2_0


def random_ternary(shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=gen).to(torch.int8)


# ---------------------------------------------------------------------------------------------- I2_S


def test_i2s_hand_built_block():
    # One 128-element block spread over two 64-wide rows: I2_S packs the flat row-major array.
    # Byte p holds flat elements p, p+32, p+64, p+96 in bits 7..6, 5..4, 3..2, 1..0; code = value + 1.
    packed = np.full(32, 0x55, dtype=np.uint8)  # 01 01 01 01: four zeros
    packed[0] = 0b10_01_00_10  # elements 0: +1, 32: 0, 64: -1, 96: +1
    packed[31] = 0b00_10_01_00  # elements 31: -1, 63: +1, 95: 0, 127: -1
    scale = np.frombuffer(np.float32(0.5).tobytes(), dtype=np.uint8)
    data = np.concatenate([packed, scale, np.zeros(28, dtype=np.uint8)])  # n/4 + 32 = 64 bytes

    weight = decode_i2s(data, (2, 64), "hand")

    expected = torch.zeros(2, 64, dtype=torch.int8)
    expected[0, 0] = 1  # flat 0
    expected[1, 0] = -1  # flat 64
    expected[1, 32] = 1  # flat 96
    expected[0, 31] = -1  # flat 31
    expected[0, 63] = 1  # flat 63
    expected[1, 63] = -1  # flat 127
    assert weight.values.dtype == torch.int8
    assert torch.equal(weight.values, expected)
    assert weight.beta == 0.5


def test_i2s_round_trip():
    values = random_ternary((96, 384), seed=1)
    data = encode_i2s(values, 0.0173)
    assert data.dtype == np.uint8 and data.size == 96 * 384 // 4 + 32
    weight = decode_i2s(data, (96, 384), "w")
    assert torch.equal(weight.values, values)
    assert weight.beta == float(np.float32(0.0173))  # stored as fp32


def test_i2s_zero_tensor_packs_to_0x55():
    data = encode_i2s(torch.zeros(4, 128, dtype=torch.int8), 1.0)
    assert (data[:128] == 0x55).all()  # docs/formats.md: "a zero tensor packs to bytes 0x55"
    assert (data[132:] == 0).all()


def test_i2s_invalid_code_names_tensor():
    data = encode_i2s(torch.zeros(1, 128, dtype=torch.int8), 1.0)
    data[5] = 0b01_11_01_01  # code 3 in the second group
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_q\.weight'.*code 3.*byte 5"):
        decode_i2s(data, (1, 128), "blk.0.attn_q.weight")


def test_i2s_rejects_bad_sizes():
    with pytest.raises(GGUFError, match="multiple of 128"):
        decode_i2s(np.zeros(48, dtype=np.uint8), (1, 64), "t")
    with pytest.raises(GGUFError, match="has 60 bytes, expected 64"):
        decode_i2s(np.zeros(60, dtype=np.uint8), (1, 128), "t")
    with pytest.raises(GGUFError, match="multiple of 128"):
        encode_i2s(torch.zeros(1, 64, dtype=torch.int8), 1.0)


def test_i2s_non_finite_scale():
    data = encode_i2s(torch.ones(1, 128, dtype=torch.int8), float("nan"))
    with pytest.raises(GGUFError, match="non-finite scale"):
        decode_i2s(data, (1, 128), "t")


# --------------------------------------------------------------------------------------------- TQ2_0


def test_tq2_0_hand_built_block():
    # Element 128h + 32n + m is in byte qs[32h + m] at bits 2n..2n+1 (n = 0 lowest); code = value + 1.
    qs = np.full(64, 0x55, dtype=np.uint8)
    qs[0] = 0b00_00_01_10  # h=0, m=0: n=0 -> +1 (element 0), n=1 -> 0 (32), n=2 -> -1 (64), n=3 -> -1 (96)
    qs[33] = 0b10_01_01_01  # h=1, m=1: n=3 -> +1, element 128 + 96 + 1 = 225
    d = np.frombuffer(np.float16(0.25).tobytes(), dtype=np.uint8)  # fp16 0x3400, stored last
    assert d.tolist() == [0x00, 0x34]
    data = np.concatenate([qs, d])

    weight = decode_tq2_0(data, (1, 256), "hand")

    expected = torch.zeros(1, 256, dtype=torch.int8)
    expected[0, 0], expected[0, 64], expected[0, 96], expected[0, 225] = 1, -1, -1, 1
    assert torch.equal(weight.values, expected)
    assert weight.beta == 0.25


def test_tq2_0_round_trip_and_gguf_py_agreement():
    values = random_ternary((8, 512), seed=2)
    values[3] = 0  # all-zero blocks: d = 0 in llama.cpp's quantizer
    beta = 0.021484375  # exact in fp16, so the comparison below is exact
    ours = encode_tq2_0(values, beta)
    dense = values.float().numpy() * beta  # (8, 512) float32: what llama.cpp's converter quantizes
    reference = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.TQ2_0).reshape(-1)
    assert np.array_equal(ours, reference)
    assert np.array_equal(gguf.quants.dequantize(ours.reshape(8, -1), gguf.GGMLQuantizationType.TQ2_0), dense)
    weight = decode_tq2_0(reference, (8, 512), "w")
    assert torch.equal(weight.values, values) and weight.beta == beta


def test_tq2_0_rounds_beta_to_fp16():
    values = random_ternary((2, 256), seed=3)
    weight = decode_tq2_0(encode_tq2_0(values, 0.0123), (2, 256), "w")
    assert torch.equal(weight.values, values)
    assert weight.beta == float(np.float16(0.0123))


def test_tq2_0_invalid_code_and_mixed_scales():
    data = encode_tq2_0(torch.ones(2, 256, dtype=torch.int8), 0.5)
    bad = data.copy()
    bad[66 + 10] = 0xFF  # second block: code 3 is not a trit
    with pytest.raises(GGUFError, match=r"'w'.*code 3 in block 1"):
        decode_tq2_0(bad, (2, 256), "w")
    mixed = data.copy()
    mixed[66 + 64 : 66 + 66] = np.frombuffer(np.float16(0.75).tobytes(), dtype=np.uint8)
    with pytest.raises(GGUFError, match=r"different scales \(0\.5 and 0\.75\)"):
        decode_tq2_0(mixed, (2, 256), "w")


def test_tq_zero_and_negative_block_scales():
    # d = 0 makes a block zero whatever its trits; d < 0 flips the block's signs (x = (t - 1) * d).
    values = random_ternary((3, 256), seed=4)
    data = encode_tq2_0(values, 0.5)
    data[64:66] = 0  # block 0: d = 0
    data[66 * 2 + 64 : 66 * 2 + 66] = np.frombuffer(np.float16(-0.5).tobytes(), dtype=np.uint8)  # block 2
    weight = decode_tq2_0(data, (3, 256), "w")
    dense = gguf.quants.dequantize(data.reshape(3, 66), gguf.GGMLQuantizationType.TQ2_0)
    assert np.array_equal(weight.dequantize().numpy(), dense)
    assert weight.values[0].abs().sum() == 0 and torch.equal(weight.values[2], -values[2])


def test_tq_rejects_rows_not_multiple_of_256():
    with pytest.raises(GGUFError, match="multiple of 256"):
        encode_tq2_0(torch.zeros(2, 128, dtype=torch.int8), 1.0)
    with pytest.raises(GGUFError, match="multiple of 256"):
        decode_tq1_0(np.zeros(54, dtype=np.uint8), (2, 128), "w")
    with pytest.raises(GGUFError, match="fp16"):
        encode_tq1_0(torch.ones(1, 256, dtype=torch.int8), 1e6)


# --------------------------------------------------------------------------------------------- TQ1_0


def tq1_byte(trits: list[int]) -> int:
    """Base-3 fixed point: v = sum t_k 3^(4-k) (k = 0 most significant), byte = ceil(v * 256 / 243)."""
    v = sum(t * 3 ** (4 - k) for k, t in enumerate(trits))
    return -(-v * 256 // 243)


def test_tq1_0_hand_built_block():
    zero5, zero4 = tq1_byte([1, 1, 1, 1, 1]), tq1_byte([1, 1, 1, 1, 0])
    assert (zero5, zero4) == (128, 127)  # ceil(121*256/243) = ceil(127.47); ceil(120*256/243) = ceil(126.4)
    qs = np.full(48, zero5, dtype=np.uint8)
    qh = np.full(4, zero4, dtype=np.uint8)
    # qs[0] holds elements 0, 32, 64, 96, 128 (e = 32k + m): +1, -1, 0, +1, -1 -> trits 2, 0, 1, 2, 0
    # v = 2*81 + 0*27 + 1*9 + 2*3 + 0 = 177 -> ceil(177*256/243) = ceil(186.47) = 187
    qs[0] = 187
    assert tq1_byte([2, 0, 1, 2, 0]) == 187
    # qs[32+3] holds elements 160 + 16k + 3: element 163 (k=0) is -1 -> trits 0,1,1,1,1 -> v = 40 -> 43
    qs[35] = 43
    # qh[2] holds elements 240 + 4k + 2 (k < 4): element 254 (k=3) is +1 -> trits 1,1,1,2,0 -> v = 123 -> 130
    qh[2] = 130
    d = np.frombuffer(np.float16(2.0).tobytes(), dtype=np.uint8)
    data = np.concatenate([qs, qh, d])
    assert data.size == 54

    weight = decode_tq1_0(data, (1, 256), "hand")

    expected = torch.zeros(1, 256, dtype=torch.int8)
    expected[0, [0, 96, 254]] = 1
    expected[0, [32, 128, 163]] = -1
    assert torch.equal(weight.values, expected)
    assert weight.beta == 2.0


def test_tq1_0_round_trip_and_gguf_py_agreement():
    values = random_ternary((6, 768), seed=5)
    values[1, :256] = 0
    beta = 0.0302734375  # exact in fp16
    ours = encode_tq1_0(values, beta)
    dense = values.float().numpy() * beta
    reference = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.TQ1_0).reshape(-1)
    assert np.array_equal(ours, reference)
    assert np.array_equal(gguf.quants.dequantize(ours.reshape(6, -1), gguf.GGMLQuantizationType.TQ1_0), dense)
    weight = decode_tq1_0(reference, (6, 768), "w")
    assert torch.equal(weight.values, values) and weight.beta == beta


def test_tq1_0_decoder_matches_gguf_py_on_arbitrary_bytes():
    # Every byte decodes to trits (the base-3 read never yields 3), so random bytes with one shared
    # scale are a valid tensor: our int8 * beta must equal gguf-py's dequantization exactly.
    rng = np.random.default_rng(6)
    blocks = rng.integers(0, 256, size=(4, 54), dtype=np.uint8)
    blocks[:, 52:54] = np.frombuffer(np.float16(0.125).tobytes(), dtype=np.uint8)
    weight = decode_tq1_0(blocks.reshape(-1), (2, 512), "w")
    dense = gguf.quants.dequantize(blocks.reshape(2, -1), gguf.GGMLQuantizationType.TQ1_0)
    assert np.array_equal(weight.dequantize().numpy(), dense)
