"""Absmean ternarization of float master weights, and checks of ternary values (docs/exactness.md)."""

from __future__ import annotations

import torch

from ..errors import CheckpointError

ABSMEAN_FLOOR = 1e-5


def absmean_ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """W (out, in) float -> (T int8 in {-1,0,1}, beta) with beta = max(mean|W|, 1e-5), T = clamp(round(W/beta))."""
    w = weight.float()
    beta = w.abs().mean().clamp(min=ABSMEAN_FLOOR)
    # round(W * (1/beta)) like the reference code (`s = 1/a; round(W*s)`), computed in fp32
    ternary = (w * (1.0 / beta)).round_().clamp_(-1, 1).to(torch.int8)
    return ternary, float(beta)


def check_ternary(values: torch.Tensor, name: str) -> None:
    """Raise CheckpointError naming `name` if any entry lies outside {-1, 0, +1}."""
    bad = (values < -1) | (values > 1)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"tensor {name!r} holds a non-ternary value {int(values[idx])} at index {list(idx)}"
        )
