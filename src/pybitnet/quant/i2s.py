"""bitnet.cpp's I2_S ternary layout (ggml type 36; FORMATS.md B.5), decoded straight to int8 + beta.

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

# bytes in which any of the four 2-bit codes is 3: one lookup over the packed bytes finds them
_HAS_CODE3 = np.array([any((b >> s) & 3 == 3 for s in _SHIFTS) for b in range(256)], dtype=bool)


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
    """(n/4 + 32,) uint8 I2_S payload -> TernaryWeight with values (out, in) int8 and the fp32 beta.

    One n-byte int8 allocation per tensor and in-place shifts: no float copy of the weights.
    """
    out_features, in_features = shape
    n = out_features * in_features
    if n % I2S_BLOCK:
        raise GGUFError(f"I2_S tensor {name!r} has shape {list(shape)}: {n} elements, not a multiple of {I2S_BLOCK}")
    if data.size != i2s_nbytes(n):
        raise GGUFError(f"I2_S tensor {name!r} has {data.size} bytes, expected {i2s_nbytes(n)} for shape {list(shape)}")
    packed = data[: n // 4]
    bad = _HAS_CODE3[packed]
    if bad.any():
        byte = int(np.argmax(bad))
        raise GGUFError(f"I2_S tensor {name!r} holds the invalid 2-bit code 3 in packed byte {byte} (non-ternary)")
    beta = float(data[n // 4 : n // 4 + 4].view(np.float32)[0])
    if not np.isfinite(beta):
        raise GGUFError(f"I2_S tensor {name!r} has a non-finite scale {beta}")

    raw = torch.from_numpy(packed.reshape(-1, 1, I2S_GROUP).copy())  # (nblk, 1, 32); copy: the map is read-only
    codes = torch.empty((n // I2S_BLOCK, 4, I2S_GROUP), dtype=torch.uint8)  # (nblk, group, byte)
    for group, shift in enumerate(_SHIFTS):
        torch.bitwise_right_shift(raw[:, 0], shift, out=codes[:, group])
    codes.bitwise_and_(3)
    values = codes.view(torch.int8).sub_(1).view(out_features, in_features)  # (out, in) in {-1,0,1}
    return TernaryWeight(values=values, beta=beta)
