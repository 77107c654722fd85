"""Per-token absmax int8 activation quantization (FORMATS.md A.3)."""

from __future__ import annotations

import torch

ACT_MAX = 127.0
ABSMAX_FLOOR = 1e-5


def quantize_activations(x: torch.Tensor, as_int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float -> (q (..., K), act_scale (..., 1)) with q = clamp(round(x * act_scale), -128, 127).

    act_scale = 127 / max(absmax(x), 1e-5) per row. Every step is per-row and elementwise (amax is
    exact in any order), so one row quantizes to the same integers whether it is alone or in a batch:
    the full and the step path feed the BitLinear GEMM identical integers.
    q is int8 when `as_int8`, else integer values in x's dtype.
    """
    act_scale = ACT_MAX / x.abs().amax(dim=-1, keepdim=True).clamp_(min=ABSMAX_FLOOR)  # (..., 1)
    q = (x * act_scale).round_().clamp_(-128.0, 127.0)  # round-half-to-even, like torch.round in HF
    if as_int8:
        q = q.to(torch.int8)
    return q, act_scale
