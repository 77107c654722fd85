"""Absmean ternarization of float master weights, and checks of ternary values (docs/exactness.md)."""

from __future__ import annotations

import torch


ABSMEAN_FLOOR = 1e-5


def absmean_ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """W (out, in) float -> (T int8 in {-1,0,1}, beta) with beta = max(mean|W|, 1e-5), T = clamp(round(W/beta))."""
    w = weight.float()
    beta = w.abs().mean().clamp(min=ABSMEAN_FLOOR)
    # round(W * (1/beta)) like the reference code (`s = 1/a; round(W*s)`), computed in fp32
    ternary = (w * (1.0 / beta)).round_().clamp_(-1, 1).to(torch.int8)
    return ternary, float(beta)
