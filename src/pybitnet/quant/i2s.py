"""bitnet.cpp's I2_S ternary layout (ggml type 36; docs/formats.md), decoded straight to int8 + beta.

The tensor is one flat row-major array of n = out*in elements, cut into 128-element blocks. Block b
is bytes 32b .. 32b+31; byte p of a block holds elements p, p+32, p+64, p+96 in bits 7..6, 5..4,
3..2, 1..0 (first group in the HIGH bits, unlike TQ2_0 and HF). Codes: 0 -> -1, 1 -> 0, 2 -> +1
(3 is invalid). After the n/4 packed bytes comes one fp32 scale (beta, multiply semantics) and
28 bytes of padding: the tensor takes n/4 + 32 bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GGUFError
from ..weights import TernaryWeight

I2S_BLOCK = 128  # elements per block
I2S_GROUP = 32  # bytes per block = elements per 2-bit group
I2S_TAIL = 32  # scale (4 bytes) + padding after the packed data
_SHIFTS = (6, 4, 2, 0)  # bit shift of group 0..3 within a byte

_LOW_BITS = np.uint32(0x55555555)  # the low bit of every 2-bit code in a 32-bit word


def i2s_nbytes(n_elements: int) -> int:
    return n_elements // 4 + I2S_TAIL


def encode_i2s(values: torch.Tensor, beta: float) -> np.ndarray:
    """values (out, in) int in {-1,0,1}, beta -> (n/4 + 32,) uint8 in the I2_S layout."""
    n = values.numel()
    if n % I2S_BLOCK:
        raise GGUFError(f"I2_S needs a multiple of {I2S_BLOCK} elements, got shape {list(values.shape)}")
    codes = (values.reshape(-1, 4, I2S_GROUP).to(torch.int16) + 1).to(torch.uint8).numpy()  # (nblk, 4, 32)
    packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]  # (nblk, 32)
    out = np.zeros(i2s_nbytes(n), dtype=np.uint8)
    out[: n // 4] = packed.reshape(-1)
    out[n // 4 : n // 4 + 4] = np.frombuffer(np.float32(beta).tobytes(), dtype=np.uint8)
    return out


def decode_i2s(data: np.ndarray, shape: tuple[int, int], name: str) -> TernaryWeight:
    """(n/4 + 32,) uint8 I2_S payload -> packed TernaryWeight (out, in) with the fp32 beta.

    Works on 32-bit words, four packed bytes at a time (SWAR): for each group, shift the word and
    mask every byte lane to its 2-bit code, then map code c -> c - 1 in every lane at once with
    ((c | 0x80) - 1) ^ 0x80 (the 0x80 bit keeps the subtraction from borrowing across lanes).
    One n-byte output per tensor and no float copy; ~4x faster than byte-wise shifts.
    """
    out_features, in_features = shape
    n = out_features * in_features
    if n % I2S_BLOCK:
        raise GGUFError(f"I2_S tensor {name!r} has shape {list(shape)}: {n} elements, not a multiple of {I2S_BLOCK}")
    if data.size != i2s_nbytes(n):
        raise GGUFError(f"I2_S tensor {name!r} has {data.size} bytes, expected {i2s_nbytes(n)} for shape {list(shape)}")
    words = data[: n // 4].view("<u4").reshape(-1, 1, I2S_GROUP // 4)  # (nblk, 1, 8): bytes 4w..4w+3 of a block
    code3 = words & (words >> 1) & _LOW_BITS  # a lane's bit pair 11 leaves its low bit set
    if code3.any():
        word = int(np.flatnonzero(code3)[0])
        lane = int(np.flatnonzero(code3.reshape(-1)[word : word + 1].view(np.uint8))[0])  # little-endian lanes
        byte = 4 * word + lane
        raise GGUFError(f"I2_S tensor {name!r} holds the invalid 2-bit code 3 in packed byte {byte} (non-ternary)")
    beta = float(data[n // 4 : n // 4 + 4].view(np.float32)[0])
    if not np.isfinite(beta):
        raise GGUFError(f"I2_S tensor {name!r} has a non-finite scale {beta}")

    lanes = np.empty((n // I2S_BLOCK, 4, I2S_GROUP // 4), dtype=np.uint32)  # (nblk, group, word)
    for group, shift in enumerate(_SHIFTS):
        np.right_shift(words[:, 0], shift, out=lanes[:, group])
    np.bitwise_and(lanes, 0x03030303, out=lanes)
    np.bitwise_or(lanes, 0x80808080, out=lanes)
    np.subtract(lanes, 0x01010101, out=lanes)
    np.bitwise_xor(lanes, 0x80808080, out=lanes)
    values = torch.from_numpy(lanes.view(np.int8).reshape(out_features, in_features))  # (out, in) in {-1,0,1}
    return TernaryWeight(values=values, beta=beta).packed_form()  # the int8 form lives for one tensor only
