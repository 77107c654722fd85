"""Per-token absmax int8 activation quantization (docs/exactness.md), optionally of an RMSNorm's output.

Every step is per row and elementwise or an exact reduction (max) / a fixed-order row reduction, so
one row quantizes to the same integers whether it runs alone or in a batch: the full and the step
path feed the BitLinear GEMM identical integers.
"""

from __future__ import annotations

import torch

ACT_MAX = 127.0
ABSMAX_FLOOR = 1e-5


def quantize_activations(x: torch.Tensor, as_int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K), act_scale (..., 1)): act_scale = 127 / max(absmax(x), 1e-5) per row,
    q = clamp(round(x * act_scale), -128, 127) (round half to even, as torch.round in HF).
    q is int8 when `as_int8`, else integer values in x's dtype."""
    act_scale = _div_into_127(absmax(x).clamp_(min=ABSMAX_FLOOR))  # (..., 1)
    q = (x * act_scale).round_().clamp_(-128.0, 127.0)
    return (q.to(torch.int8) if as_int8 else q), act_scale


def quantize_normed(x: torch.Tensor, row_scale: torch.Tensor, norm_weight: torch.Tensor | None = None,
                    eps: float = 0.0, as_int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activations(RMSNorm(row_scale * x)) (or of row_scale * x when norm_weight is None)
    without materializing the scaled or normed tensor.

    x (M, K) raw rows, row_scale (M, 1) a positive per-row factor still to be applied, norm_weight
    (K,) the RMSNorm weight. Absmax quantization is invariant to a positive per-row factor, so with
    t = w * x (or t = x):
        q = round(t * 127 / absmax(t)),   act_scale = 127 / max(absmax(t) * c * r, 1e-5)
    where c = row_scale and r = 1 / sqrt(mean((c x)^2) + eps) the RMSNorm factor (1 without a norm).
    Callers hand over unscaled integer-valued products (the FFN's relu(g)^2 * u) this way.
    """
    factor = row_scale  # (M, 1): c, times r with a norm
    if norm_weight is not None:
        mean_sq = torch.linalg.vecdot(x, x).unsqueeze(-1) / x.shape[-1] * (row_scale * row_scale)  # (M, 1)
        factor = row_scale * torch.rsqrt(mean_sq + eps)
        t = x * norm_weight  # (M, K)
    else:
        t = x.clone()
    act_scale = _div_into_127((absmax(t) * factor).clamp_(min=ABSMAX_FLOOR))  # (M, 1)
    q = t.mul_(act_scale * factor).round_().clamp_(-128.0, 127.0)
    return (q.to(torch.int8) if as_int8 else q), act_scale


def absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, (..., 1): as max(max x, -min x), two passes without an |x| temporary
    (measured 0.17 ms for 512 x 6912, against 0.28 for abs().amax() and 5.7 for vector_norm(inf))."""
    return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())


def _div_into_127(absmax: torch.Tensor) -> torch.Tensor:
    """127 / absmax as one correctly rounded division. (`127.0 / tensor` in torch is
    tensor.reciprocal() * 127: two roundings, which moves x * scale off an exact .5 tie.)"""
    return torch.full_like(absmax, ACT_MAX).div_(absmax)
