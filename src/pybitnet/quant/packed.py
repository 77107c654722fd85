"""pybitnet's own packed ternary layout: 2 bits per weight, made for the native kernel.

A weight (N, K) with values in {-1, 0, +1} is stored as uint8 (N, KB * 64), KB = ceil(K / 256):
each row is cut into blocks of 256 weights held in 64 bytes. Byte j (0..63) of block b holds the
weights at columns 256b + 64s + j for s = 0..3, in bits 2s..2s+1, as the code w + 1 in {0, 1, 2}.
Columns past K (the last block's padding) hold code 1, weight 0.

Why this shape: one 64-byte load and a shift/mask per s give four 64-byte vectors of codes, each
lined up with 64 contiguous int8 activations; that is one `vpdpbusd` (u8 x s8) per vector. The
+1 offset makes every code unsigned, and q · w = q · code - sum(q).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from ..errors import CheckpointError

BLOCK = 256  # weights per block
BLOCK_BYTES = BLOCK // 4
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def packed_columns(in_features: int) -> int:
    """Bytes per packed row for K = in_features."""
    return -(-in_features // BLOCK) * BLOCK_BYTES


def padded_features(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """values (N, K) integer in {-1, 0, 1} -> packed (N, ceil(K/256) * 64) uint8 (values are not checked)."""
    n, k = values.shape
    codes = torch.ones(n, padded_features(k), dtype=torch.uint8, device=values.device)  # padding: weight 0
    codes[:, :k] = values.to(torch.int8).view(torch.uint8) + 1  # -1 -> 0 (wraps), 0 -> 1, 1 -> 2
    blocks = codes.view(n, -1, 4, BLOCK_BYTES)  # (N, KB, s, j)
    packed = blocks[:, :, 0] | (blocks[:, :, 1] << 2)
    packed |= blocks[:, :, 2] << 4
    packed |= blocks[:, :, 3] << 6
    return packed.reshape(n, -1)


def unpack_ternary(packed: torch.Tensor, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed (N, KB * 64) uint8 -> int8 (N, KB * 256) values; columns past in_features are 0.

    `out`, if given, is a contiguous int8 buffer of N * KB * 256 elements that is filled and returned
    (callers reuse one buffer across layers). Slice [:, :in_features] for the exact (N, K) values.
    """
    n, cols = packed.shape
    if cols != packed_columns(in_features):
        raise CheckpointError(f"packed ternary weight has {cols} bytes per row, expected {packed_columns(in_features)} "
                              f"for {in_features} input features")
    target = torch.empty(n, cols * 4, dtype=torch.int8, device=packed.device) if out is None else out.view(n, cols * 4)
    codes = target.view(torch.uint8).view(n, -1, 4, BLOCK_BYTES)  # (N, KB, s, j)
    torch.bitwise_right_shift(packed.view(n, -1, 1, BLOCK_BYTES), _SHIFTS.to(packed.device), out=codes)
    codes.bitwise_and_(3).sub_(1)  # uint8 arithmetic wraps 0 - 1 to 255, which is int8 -1
    return target


def _libc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_malloc_trim = _libc_trim()


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc malloc_trim; a no-op elsewhere).

    Decoding a tensor allocates int8 temporaries several times the packed result; freed, they stay
    in the heap between packed tensors that live on, and the heap only grows over a model's load."""
    if _malloc_trim is not None:
        _malloc_trim(0)
