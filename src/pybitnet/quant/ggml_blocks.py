"""ggml's Q8_0, Q4_0, Q6_K, Q5_K and Q4_K block layouts (docs/formats.md), and a float table held in them.

A GGUF embedding or output table quantized by llama.cpp is kept as it is stored: a uint8 tensor
(rows, bytes per row) that `QuantizedTable` dequantizes a few rows at a time (an embedding lookup, a
tile of the head) instead of a float32 copy of the whole table (a Q6_K table is 0.82 bytes per value;
float32 is 4).

Q8_0 (34 bytes per block of 32): f16 d, then 32 int8 q;  value = d * q.
Q4_0 (18 bytes per block of 32): f16 d, qs[16]. Element l < 16 has the code qs[l] & 15, element
  l + 16 the code qs[l] >> 4, and the value d * (code - 8): exact in float32 (an 11-bit significand
  times a 4-bit integer), no rounding at all (ggml's dequantize_row_q4_0).
Q6_K (210 bytes per super-block of 256): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16],
  f16 d. Element 128h + 32k + l (h < 2, k < 4, l < 32) has the 6-bit code
      (ql[64h + 32(k % 2) + l] >> 4(k // 2)) & 15  |  ((qh[32h + l] >> 2k) & 3) << 4
  and the value (d * scales[8h + 2k + l // 16]) * (code - 32), in float32: d * scale is exact, the
  product with the code rounds once. This is ggml's dequantize_row_q6_K to the bit.
Q4_K (144 bytes per super-block of 256): f16 d, f16 dmin, scales[12] (eight 6-bit scales and eight
  6-bit mins), qs[128]. Sub-block s (of 32) has scale sc and min m: for s < 4, sc = scales[s] & 63,
  m = scales[s + 4] & 63; else sc = scales[s + 4] & 15 | (scales[s - 4] >> 6) << 4,
  m = scales[s + 4] >> 4 | (scales[s] >> 6) << 4. Element 64j + 32t + l (j < 4, t < 2, l < 32) is in
  sub-block 2j + t with the code (qs[32j + l] >> 4t) & 15 and the value
  (d * sc) * code - (dmin * m): both products exact, the difference rounds once (ggml's dequantize_row_q4_K).
Q5_K (176 bytes per super-block of 256): f16 d, f16 dmin, scales[12] (packed as Q4_K's), qh[32],
  qs[128]. Element 64j + 32t + l is in sub-block s = 2j + t with the 5-bit code
      (qs[32j + l] >> 4t) & 15  |  ((qh[l] >> s) & 1) << 4
  and the value (d * sc) * code - (dmin * m): d * sc has at most 17 significant bits and the code 5,
  so every product is exact and only the difference rounds, once (ggml's dequantize_row_q5_K).

The quantizers follow ggml's reference rounding (quantize_row_q8_0_ref, quantize_row_q4_0_ref,
quantize_row_q6_K_ref with its make_qx_quants search, quantize_row_q4_K_ref and quantize_row_q5_K_ref
with make_qkx2_quants), so a table written here holds the bytes llama.cpp would write.

Layering: a byte format. It imports torch, numpy and gguf-py only.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from torch import nn

QK_K = 256
# type name -> (elements per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q6_K": (256, 210), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q4_0": (32, 18)}
KEPT_TYPES = tuple(BLOCKS)
# the kind argument of the native quant_head op; a type without one runs the head in torch (head.LMHead)
NATIVE_KIND = {"Q8_0": 0, "Q6_K": 1, "Q4_K": 2, "Q5_K": 3, "Q4_0": 4}
# byte range of each block's f16 scales: d, and dmin after it for the types with a min
_SCALE_BYTES = {"Q8_0": (0, 2), "Q4_0": (0, 2), "Q6_K": (208, 210), "Q4_K": (0, 4), "Q5_K": (0, 4)}
# the make_qkx2_quants search of the types with a scale and a min: (nmax, rmin, rdelta, nstep)
_QKX2_SEARCH = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}
_GROUP_MAX_EPS = np.float32(1e-15)


def row_bytes(type_name: str, cols: int) -> int:
    block, nbytes = BLOCKS[type_name]
    if cols % block:
        raise ValueError(f"{type_name} rows must be a multiple of {block} elements, got {cols}")
    return cols // block * nbytes


# ------------------------------------------------------------------------------------------------
# dequantization (torch, any device)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian f16 bits -> (...) float32."""
    return raw.contiguous().view(torch.float16)[..., 0].float()


def dequantize_rows(data: torch.Tensor, type_name: str, cols: int) -> torch.Tensor:
    """(n, bytes per row) uint8 -> (n, cols) float32, the values ggml's dequantize_row_* gives."""
    n = data.shape[0]
    block, nbytes = BLOCKS[type_name]
    blocks = data.reshape(n, cols // block, nbytes)
    if type_name == "Q8_0":
        d = _f16(blocks[..., :2])  # (n, nb)
        q = blocks[..., 2:].contiguous().view(torch.int8).float()  # (n, nb, 32)
        return (q * d[..., None]).reshape(n, cols)
    if type_name == "Q4_0":
        d = _f16(blocks[..., :2])  # (n, nb)
        qs = blocks[..., 2:]  # (n, nb, 16)
        q = torch.cat([qs & 15, qs >> 4], dim=2).float() - 8.0  # (n, nb, 32): low nibbles first
        return (q * d[..., None]).reshape(n, cols)
    nb = cols // QK_K
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # (n, nb)
        sc, m = _q4_k_scales(blocks[..., 4:16])  # (n, nb, 8) each
        qs = blocks[..., nbytes - 128 :].reshape(n, nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(n, nb, 8, 32)  # sub-block 2j + t
        if type_name == "Q5_K":  # bit s of qh[l] is the fifth bit of element l of sub-block s
            qh = blocks[..., 16:48].reshape(n, nb, 1, 32)
            shifts = torch.arange(8, dtype=torch.uint8, device=data.device).reshape(1, 1, 8, 1)
            q = q | (((qh >> shifts) & 1) << 4)
        step, low = d[..., None] * sc.float(), dmin[..., None] * m.float()  # exact products
        return (step[..., None] * q.float() - low[..., None]).reshape(n, cols)
    ql = blocks[..., :128].reshape(n, nb, 2, 2, 32)  # [h, k % 2, l]
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)  # [h, ., l]
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float()  # (n, nb, 16)
    d = _f16(blocks[..., 208:210])  # (n, nb)
    low = torch.cat([ql & 15, ql >> 4], dim=3)  # (n, nb, 2, 4, 32): k = 0, 1 low nibbles, 2, 3 high
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=data.device).reshape(1, 1, 1, 4, 1)
    high = (qh >> shifts) & 3  # (n, nb, 2, 4, 32)
    q = (low | (high << 4)).float() - 32.0
    step = (d[..., None] * scales).reshape(n, nb, 2, 4, 2).repeat_interleave(16, dim=-1)  # d * scale, exact
    return (step * q).reshape(n, cols)


def _q4_k_scales(raw):
    """(..., 12) uint8 scale bytes of Q4_K blocks -> (sc, m), each (..., 8) ints 0..63 (ggml's
    get_scale_min_k4); torch tensors or numpy arrays."""
    cat = torch.cat if isinstance(raw, torch.Tensor) else np.concatenate
    a, b, c = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    sc = cat([a & 63, (c & 15) | ((a >> 6) << 4)], -1)
    m = cat([b & 63, (c >> 4) | ((b >> 6) << 4)], -1)
    return sc, m


# ------------------------------------------------------------------------------------------------
# quantization (numpy, ggml's reference rounding)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (adding 1.5 * 2^23 in float32): round half to even for |v| < 2^22."""
    return np.rint(np.clip(v, -(2.0**22), 2.0**22)).astype(np.int32)


def _make_qx_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(16, 32, x, L, rmse_type=1, NULL) for every group of 16: x (S, 16) float32 ->
    (scale (S,) float32, L (S, 16) int32 in 0..63). Sums run over the 16 elements in order, in float32."""
    nmax = np.float32(32)
    ax = np.abs(x)
    first = np.argmax(ax, axis=1)  # the first element of largest magnitude, as ggml's strict '>' keeps it
    amax = ax[np.arange(len(x)), first]
    xmax = x[np.arange(len(x)), first]
    zero = amax < _GROUP_MAX_EPS
    safe = np.where(zero, np.float32(1), xmax).astype(np.float32)
    w = np.ascontiguousarray((x * x).T)  # (16, S): element i of every group in one row
    wx = w * np.ascontiguousarray(x.T)  # w * x, as ggml's w*x[i]*l evaluates it first

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(_nearest_int(iscale[:, None] * x), -32, 31)
        lf = np.ascontiguousarray(l.T, dtype=np.float32)  # (16, S)
        sumlx = np.zeros(len(x), np.float32)
        suml2 = np.zeros(len(x), np.float32)
        for i in range(16):
            sumlx += wx[i] * lf[i]
            suml2 += (w[i] * lf[i]) * lf[i]
        return l, sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (-nmax / safe).astype(np.float32)
        l, sumlx, suml2 = sums(iscale)
        L = l + 32
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, 1), 0).astype(np.float32)
        best = (scale * sumlx).astype(np.float32)
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = (-(nmax + np.float32(0.1) * np.float32(step)) / safe).astype(np.float32)
            l, sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l + 32, L)
            scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, 1), scale).astype(np.float32)
            best = np.where(better, scale * sumlx, best).astype(np.float32)
    L[zero] = 0
    scale[zero] = 0
    return scale, L


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(n, cols) float32 -> (n, cols / 256 * 210) uint8: ggml's quantize_row_q6_K_ref."""
    n, cols = x.shape
    nb = cols // QK_K
    blocks = x.reshape(n * nb, QK_K)
    scales, L = _make_qx_quants(blocks.reshape(-1, 16))
    scales, L = scales.reshape(-1, 16), L.reshape(-1, QK_K)
    first = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(len(scales)), first]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (np.float32(-128) / np.where(zero, np.float32(1), max_scale)).astype(np.float32)
        d16 = (np.float32(1) / iscale).astype(np.float32).astype(np.float16)
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)  # (B, 16)
        dj = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (B, 16), exact
        live = dj != 0
        l = np.clip(_nearest_int(blocks.reshape(-1, 16, 16) / np.where(live, dj, 1)[..., None]), -32, 31) + 32
    L = np.where(live[..., None], l, L.reshape(-1, 16, 16)).reshape(-1, 2, 4, 32).astype(np.uint8)  # [h, k, l]
    ql = np.concatenate([L[:, :, 0] & 15 | (L[:, :, 2] & 15) << 4, L[:, :, 1] & 15 | (L[:, :, 3] & 15) << 4], axis=2)
    qh = (L[:, :, 0] >> 4) | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d16.reshape(-1, 1).view(np.uint8)],
                         axis=1)  # (B, 210)
    out[zero] = 0
    return out.reshape(n, nb * 210)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                      nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants(32, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, false) for every
    group: x, weights (S, 32) float32 -> (scale (S,), the_min (S,), L (S, 32) int32). Float32 operations in
    ggml's order, sums over the 32 elements one after another."""
    f32 = np.float32
    S, n = x.shape
    xT, wT = np.ascontiguousarray(x.T), np.ascontiguousarray(weights.T)  # (32, S)
    lo, hi = xT[0].copy(), xT[0].copy()
    sum_w = wT[0].copy()
    sum_x = sum_w * xT[0]
    for i in range(1, n):
        lo = np.where(xT[i] < lo, xT[i], lo)
        hi = np.where(xT[i] > hi, xT[i], hi)
        sum_w += wT[i]
        sum_x += wT[i] * xT[i]
    lo = np.where(lo > 0, f32(0), lo)
    flat = hi == lo
    span = np.where(flat, f32(1), hi - lo)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / span
        scale = f32(1) / iscale
        L = np.clip(_nearest_int(iscale * (xT - lo)), 0, nmax)  # (32, S)
        Lf = L.astype(f32)
        best = np.zeros(S, f32)
        for i in range(n):
            diff = scale * Lf[i] + lo - xT[i]
            best += wT[i] * (diff * diff)
        low = lo
        for step in range(nstep + 1):
            # ggml's `min` is the best min so far, in the span as in the offsets
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), hi - low)
            aux = np.clip(_nearest_int(iscale * (xT - low)), 0, nmax)
            auxf = aux.astype(f32)
            sum_l = np.zeros(S, f32)
            sum_l2 = np.zeros(S, f32)
            sum_xl = np.zeros(S, f32)
            for i in range(n):
                wl = wT[i] * auxf[i]
                sum_l += wl
                sum_l2 += wl * auxf[i]
                sum_xl += wl * xT[i]
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            safe_d = np.where(ok, D, f32(1))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
            positive = this_min > 0
            this_min = np.where(positive, f32(0), this_min)
            this_scale = np.where(positive, sum_xl / np.where(sum_l2 != 0, sum_l2, f32(1)), this_scale)
            cur = np.zeros(S, f32)
            for i in range(n):
                diff = this_scale * auxf[i] + this_min - xT[i]
                cur += wT[i] * (diff * diff)
            better = ok & (cur < best)
            L = np.where(better, aux, L)
            Lf = L.astype(f32)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    L = np.where(flat, 0, L)
    scale = np.where(flat, f32(0), scale).astype(f32)
    return scale, (-low).astype(f32), np.ascontiguousarray(L.T)


def _quantize_scale_min_k(x: np.ndarray, type_name: str) -> np.ndarray:
    """(n, cols) float32 -> (n, cols / 256 * bytes per block) uint8: ggml's quantize_row_q4_K_ref or
    quantize_row_q5_K_ref, which differ only in the code range (15 or 31), the make_qkx2_quants search
    and where the codes go."""
    f32 = np.float32
    n, cols = x.shape
    nmax, rmin, rdelta, nstep = _QKX2_SEARCH[type_name]
    groups = x.reshape(-1, 32)  # (S, 32), 8 per block
    sum_x2 = np.zeros(len(groups), f32)
    for i in range(32):
        sum_x2 += groups[:, i] * groups[:, i]
    av_x = np.sqrt(sum_x2 / f32(32))
    scales, mins, L = _make_qkx2_quants(groups, av_x[:, None] + np.abs(groups), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))  # ggml: the largest above 0, else 0
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0)).astype(f32)
        ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 255)  # uint8_t, then MIN(63, .)
        lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 255)
        packed = np.empty((len(ls), 12), np.uint8)
        packed[:, 0:4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
        packed[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
        packed[:, 8:12] = (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4
        d16 = (max_scale / f32(63)).astype(f32).astype(np.float16)
        dmin16 = (max_min / f32(63)).astype(f32).astype(np.float16)
        sc, m = _q4_k_scales(packed)
        d = d16.astype(f32)[:, None] * sc.astype(f32)  # (B, 8)
        dm = dmin16.astype(f32)[:, None] * m.astype(f32)
        live = d != 0
        blocks = x.reshape(-1, 8, 32)
        fresh = np.clip(_nearest_int((blocks + dm[..., None]) / np.where(live, d, f32(1))[..., None]), 0, nmax)
    L = np.where(live[..., None], fresh, L.reshape(-1, 8, 32)).astype(np.uint8)  # (B, sub-block, element)
    pairs = L.reshape(-1, 4, 2, 32)  # sub-blocks 2j and 2j + 1 share the bytes qs[32j : 32j + 32]
    qs = ((pairs[:, :, 0] & 15) | (pairs[:, :, 1] & 15) << 4).reshape(-1, 128)
    parts = [d16.reshape(-1, 1).view(np.uint8), dmin16.reshape(-1, 1).view(np.uint8), packed]
    if type_name == "Q5_K":  # the fifth bit of element l of sub-block s is bit s of qh[l]
        high = (L >> 4).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
        parts.append(np.bitwise_or.reduce(high, axis=1))  # (B, 32)
    out = np.concatenate(parts + [qs], axis=1)
    return out.reshape(n, -1)


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """(n, cols) float32 -> (n, cols / 32 * 18) uint8: ggml's quantize_row_q4_0_ref."""
    f32 = np.float32
    n, cols = x.shape
    blocks = x.reshape(-1, 32)
    ax = np.abs(blocks)
    first = np.argmax(ax, axis=1)  # the first element of largest magnitude, as ggml's strict '<' keeps it
    rows = np.arange(len(blocks))
    # ggml starts from max = +0 and never replaces it in a block of zeros: d is then -0, whatever the zeros' signs
    peak = np.where(ax[rows, first] > 0, blocks[rows, first], f32(0))
    d = (peak / f32(-8)).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d != 0, f32(1) / np.where(d != 0, d, f32(1)), f32(0)).astype(f32)
        shifted = (blocks * inv[:, None] + f32(8.5)).astype(f32)  # in [0.5, 16.5]: (int8_t) truncates it
    codes = np.minimum(15, np.trunc(shifted).astype(np.int32)).astype(np.uint8)
    qs = codes[:, :16] | codes[:, 16:] << 4
    out = np.concatenate([d.astype(np.float16).reshape(-1, 1).view(np.uint8), qs], axis=1)
    return out.reshape(n, cols // 32 * 18)


def quantize_rows(x: np.ndarray | torch.Tensor, type_name: str, chunk: int = 1024) -> np.ndarray:
    """(n, cols) float -> (n, bytes per row) uint8 in `type_name`, with ggml's reference rounding,
    `chunk` rows at a time (float32 of one chunk at most)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    n, cols = x.shape
    out = np.empty((n, row_bytes(type_name, cols)), dtype=np.uint8)
    for start in range(0, n, chunk):
        part = x[start : start + chunk]
        part = part.float().numpy() if isinstance(part, torch.Tensor) else np.asarray(part, dtype=np.float32)
        part = np.ascontiguousarray(part, dtype=np.float32)
        if type_name == "Q8_0":
            out[start : start + chunk] = gguf.quants.quantize(part, gguf.GGMLQuantizationType.Q8_0).reshape(len(part), -1)
        elif type_name == "Q4_0":
            out[start : start + chunk] = _quantize_q4_0(part)
        elif type_name == "Q6_K":
            out[start : start + chunk] = _quantize_q6_k(part)
        else:
            out[start : start + chunk] = _quantize_scale_min_k(part, type_name)
    return out


# ------------------------------------------------------------------------------------------------
# the table


class QuantizedTable(nn.Module):
    """A (rows, cols) float table held as ggml blocks: `data` (rows, bytes per row) uint8, `type_name`
    one of BLOCKS. Indexing it (`table[ids]`, `table[a:b]`) dequantizes only those rows, to float32.

    It carries no autograd graph: `detach()` is the table itself."""

    def __init__(self, data: torch.Tensor, type_name: str, cols: int):
        super().__init__()
        if type_name not in BLOCKS:
            raise ValueError(f"unsupported table type {type_name!r}; kept as stored: {', '.join(BLOCKS)}")
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes(type_name, cols):
            raise ValueError(f"{type_name} table of {cols} columns needs uint8 (rows, {row_bytes(type_name, cols)}), "
                             f"got {data.dtype} {tuple(data.shape)}")
        self.type_name = type_name
        self.cols = int(cols)
        self.register_buffer("data", data)
        # set once every scale was seen finite: the blocks are never written, and a second look at a
        # mapped table would bring all its pages back into the process
        self.scales_finite = False

    @classmethod
    def quantize(cls, table: torch.Tensor, type_name: str) -> "QuantizedTable":
        return cls(torch.from_numpy(quantize_rows(table, type_name)), type_name, table.shape[1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.cols))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def detach(self) -> "QuantizedTable":
        return self

    def __getitem__(self, index) -> torch.Tensor:
        """Rows of the table as float32: index a LongTensor of row ids (any shape) or a slice."""
        if isinstance(index, slice):
            return dequantize_rows(self.data[index], self.type_name, self.cols)
        index = torch.as_tensor(index, device=self.device)
        flat = index.reshape(-1)
        return dequantize_rows(self.data[flat], self.type_name, self.cols).reshape(*index.shape, self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32, chunk: int = 4096) -> torch.Tensor:
        """The whole table as `dtype` (float32 values, widened or narrowed after)."""
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        for start in range(0, self.shape[0], chunk):
            out[start : start + chunk] = self[start : start + chunk]
        return out

    def scales(self) -> torch.Tensor:
        """Every block's f16 scales (d, and dmin where the type has one) as float32 (the finite check of a
        loaded table)."""
        nbytes = BLOCKS[self.type_name][1]
        first, end = _SCALE_BYTES[self.type_name]
        scales = self.data.reshape(-1, nbytes)[:, first:end]
        return _f16(scales.reshape(-1, (end - first) // 2, 2)).reshape(-1)

    def extra_repr(self) -> str:
        return f"{self.type_name}, shape={list(self.shape)}"
