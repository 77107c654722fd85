"""llama.cpp's TQ1_0 and TQ2_0 ternary layouts (ggml types 34/35; docs/formats.md), to and from int8 + beta.

Both cut each row into 256-element blocks with one fp16 scale d stored LAST in the block; an
element is (t - 1) * d for a trit t in {0, 1, 2}. A BitNet tensor has d = beta in every block that
holds a nonzero (d = 0 in all-zero blocks), so it decodes losslessly to one beta per tensor, up to
beta's fp16 rounding. A file whose blocks carry different scales is not a BitNet ternary tensor
and is rejected rather than approximated.

TQ2_0 (66 bytes/block): element 128h + 32n + m sits in byte qs[32h + m], bits 2n..2n+1 (LOW first).
TQ1_0 (54 bytes/block): 5 trits per byte in base-3 fixed point (byte = ceil(v * 256 / 243));
  elements 0..159 -> qs[0:32], 160..239 -> qs[32:48], 240..255 -> qh[0:4]; trit k of byte b is
  ((b * 3^k) mod 256) * 3 >> 8, k = 0 the most significant.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GGUFError
from ..weights import TernaryWeight

QK_K = 256
TQ2_0_BLOCK_BYTES = 66
TQ1_0_BLOCK_BYTES = 54

_TQ2_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)
_HAS_CODE3 = np.array([any((b >> s) & 3 == 3 for s in (0, 2, 4, 6)) for b in range(256)], dtype=bool)
# _TRIT[k, b] = trit k (0 = most significant) of TQ1_0 byte b, minus 1: the ternary value
_TRIT = np.array(
    [[(((b * 3**k) & 0xFF) * 3 >> 8) - 1 for b in range(256)] for k in range(5)], dtype=np.int8
)  # (5, 256)
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _blocks_of(values: torch.Tensor, beta: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """values (out, in) ternary -> (trits (nblk, 256) uint8 in {0,1,2}, d bytes (nblk, 2) uint8)."""
    if values.dim() != 2 or values.shape[1] % QK_K:
        raise GGUFError(f"{kind} needs rows that are a multiple of {QK_K} elements, got shape {list(values.shape)}")
    if beta < 0:  # keep d >= 0 like llama.cpp's quantizer (d = max|x|)
        values, beta = -values, -beta
    with np.errstate(over="ignore"):  # overflow is reported below, by name
        scale = np.float16(beta)
    if not np.isfinite(scale) or (scale == 0 and beta != 0):
        raise GGUFError(f"{kind}: scale {beta} does not fit an fp16 block scale")
    trits = (values.reshape(-1, QK_K).to(torch.int16) + 1).to(torch.uint8).numpy()  # (nblk, 256)
    nonzero_block = (trits != 1).any(axis=1)  # all-zero blocks get d = 0, as max|x| = 0 there
    d = np.where(nonzero_block, scale, np.float16(0)).astype("<f2")
    return trits, d.view(np.uint8).reshape(-1, 2)


def encode_tq2_0(values: torch.Tensor, beta: float) -> np.ndarray:
    """values (out, in) ternary, beta -> (nblk * 66,) uint8 TQ2_0 blocks."""
    trits, d = _blocks_of(values, beta, "TQ2_0")
    groups = trits.reshape(-1, 2, 4, 32) << _TQ2_SHIFTS.reshape(1, 1, 4, 1)  # (nblk, h, n, m)
    qs = np.bitwise_or.reduce(groups, axis=2).reshape(-1, 64)  # byte 32h + m
    return np.concatenate([qs, d], axis=1).reshape(-1)


def encode_tq1_0(values: torch.Tensor, beta: float) -> np.ndarray:
    """values (out, in) ternary, beta -> (nblk * 54,) uint8 TQ1_0 blocks."""
    trits, d = _blocks_of(values, beta, "TQ1_0")
    t = trits.astype(np.uint16)
    qs0 = (t[:, :160].reshape(-1, 5, 32) * _POW3.reshape(1, 5, 1)).sum(axis=1)  # (nblk, 32)
    qs1 = (t[:, 160:240].reshape(-1, 5, 16) * _POW3.reshape(1, 5, 1)).sum(axis=1)  # (nblk, 16)
    qh = (t[:, 240:].reshape(-1, 4, 4) * _POW3[:4].reshape(1, 4, 1)).sum(axis=1)  # (nblk, 4)
    v = np.concatenate([qs0, qs1, qh], axis=1)
    packed = ((v * 256 + 242) // 243).astype(np.uint8)  # ceil(v * 256 / 243)
    return np.concatenate([packed, d], axis=1).reshape(-1)


def _check_size(data: np.ndarray, shape: tuple[int, int], block_bytes: int, kind: str, name: str) -> int:
    out_features, in_features = shape
    if in_features % QK_K:
        raise GGUFError(f"{kind} tensor {name!r} has rows of {in_features} elements, not a multiple of {QK_K}")
    nblk = out_features * in_features // QK_K
    if data.size != nblk * block_bytes:
        raise GGUFError(
            f"{kind} tensor {name!r} has {data.size} bytes, expected {nblk * block_bytes} for shape {list(shape)}"
        )
    return nblk


def _apply_block_scales(values: np.ndarray, d_bytes: np.ndarray, kind: str, name: str) -> float:
    """Fold the per-block fp16 scales into one beta; values (nblk, 256) int8 are fixed up in place.

    Blocks with d = 0 decode to zeros whatever their trits say; a negative d flips its block's signs.
    Every block that holds a nonzero must then share one |d|, else the tensor is not ternary * beta.
    """
    d = d_bytes.copy().view("<f2").reshape(-1).astype(np.float32)  # (nblk,)
    if not np.isfinite(d).all():
        block = int(np.argmin(np.isfinite(d)))
        raise GGUFError(f"{kind} tensor {name!r} has a non-finite scale in block {block}")
    if (d == 0).any():
        values[d == 0] = 0
    if (d < 0).any():
        values[d < 0] *= -1
    used = np.abs(d)[(values != 0).any(axis=1)]
    if used.size == 0:
        return 0.0
    beta = float(used[0])
    if (used != beta).any():
        other = float(used[np.argmax(used != beta)])
        raise GGUFError(
            f"{kind} tensor {name!r} has blocks with different scales ({beta} and {other}): "
            "not a BitNet ternary tensor with one scale"
        )
    return beta


def decode_tq2_0(data: np.ndarray, shape: tuple[int, int], name: str) -> TernaryWeight:
    """(nblk * 66,) uint8 -> packed TernaryWeight (out, in), beta = the blocks' common |d|."""
    nblk = _check_size(data, shape, TQ2_0_BLOCK_BYTES, "TQ2_0", name)
    blocks = data.reshape(nblk, TQ2_0_BLOCK_BYTES)
    qs = blocks[:, :64]
    bad = _HAS_CODE3[qs]
    if bad.any():
        block = int(np.argmax(bad.any(axis=1)))
        raise GGUFError(f"TQ2_0 tensor {name!r} holds the invalid 2-bit code 3 in block {block} (non-ternary)")
    codes = (qs.reshape(nblk, 2, 1, 32) >> _TQ2_SHIFTS.reshape(1, 1, 4, 1)) & 3  # (nblk, h, n, m)
    values = codes.reshape(nblk, QK_K).view(np.int8) - np.int8(1)  # element 128h + 32n + m
    beta = _apply_block_scales(values, blocks[:, 64:66], "TQ2_0", name)
    return TernaryWeight(values=torch.from_numpy(values).view(shape), beta=beta).packed_form()


def decode_tq1_0(data: np.ndarray, shape: tuple[int, int], name: str) -> TernaryWeight:
    """(nblk * 54,) uint8 -> packed TernaryWeight (out, in), beta = the blocks' common |d|."""
    nblk = _check_size(data, shape, TQ1_0_BLOCK_BYTES, "TQ1_0", name)
    blocks = data.reshape(nblk, TQ1_0_BLOCK_BYTES)
    part0 = _TRIT[:, blocks[:, :32]].transpose(1, 0, 2).reshape(nblk, 160)  # elements 32k + m
    part1 = _TRIT[:, blocks[:, 32:48]].transpose(1, 0, 2).reshape(nblk, 80)  # 160 + 16k + m
    part2 = _TRIT[:4, blocks[:, 48:52]].transpose(1, 0, 2).reshape(nblk, 16)  # 240 + 4k + j
    values = np.concatenate([part0, part1, part2], axis=1)  # (nblk, 256) int8
    beta = _apply_block_scales(values, blocks[:, 52:54], "TQ1_0", name)
    return TernaryWeight(values=torch.from_numpy(values).view(shape), beta=beta).packed_form()
