"""Absmean ternarization of float master weights, and checks of ternary values (docs/exactness.md)."""

from __future__ import annotations

import torch


ABSMEAN_FLOOR = 1e-5
# Elements per partial sum in `absmean`. Below torch's parallel grain (32768), so a reduction over one
# chunk runs on one thread, and a reduction over many chunks is split between threads by chunk only.
ABSMEAN_CHUNK = 4096


def _fixed_order_sum(values: torch.Tensor) -> torch.Tensor:
    """The float64 sum of a 1-D tensor in an order set by its length alone, never by the thread count:
    whole chunks of ABSMEAN_CHUNK elements are summed each on one thread, then the chunk sums (and
    the short tail) the same way, until one value is left."""
    while values.numel() > ABSMEAN_CHUNK:
        whole = values.numel() // ABSMEAN_CHUNK * ABSMEAN_CHUNK
        sums = values[:whole].view(-1, ABSMEAN_CHUNK).sum(dim=1, dtype=torch.float64)  # one thread per chunk
        tail = values[whole:].sum(dtype=torch.float64).reshape(1)  # < ABSMEAN_CHUNK elements: one thread
        values = torch.cat([sums, tail])
    return values.sum(dtype=torch.float64)


def absmean(weight: torch.Tensor) -> torch.Tensor:
    """β = max(mean|W|, 1e-5) of a float weight, a 0-dim tensor: float64 for a float64 W, else float32.

    The one absmean of the package: loading float master weights and training (every forward and the
    export) call it, so an exported β is the training forward's β. |W| is summed in float64 in an order
    that depends only on W's size (`_fixed_order_sum`), then divided and rounded once: the same bits
    with 1 or N threads. A float32 reduction would not do: torch splits it between threads, and the
    split moves the rounding of the sum (a β one ulp apart flips ternary values and greedy tokens).
    Across machines the float64 chunk sums may differ in their last bit with torch's vector width; a
    float32 β sees that only when the mean lies within about 2^-29 of a float32 rounding boundary."""
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    total = _fixed_order_sum(weight.detach().abs().reshape(-1))
    return (total / max(weight.numel(), 1)).to(out_dtype).clamp(min=ABSMEAN_FLOOR)


def absmean_ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """W (out, in) float -> (T int8 in {-1,0,1}, beta) with beta = max(mean|W|, 1e-5), T = clamp(round(W/beta))."""
    w = weight.float()
    beta = absmean(w)
    # round(W * (1/beta)) like the reference code (`s = 1/a; round(W*s)`), computed in fp32
    ternary = (w * (1.0 / beta)).round_().clamp_(-1, 1).to(torch.int8)
    return ternary, float(beta)
