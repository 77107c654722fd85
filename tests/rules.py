"""The two agreement rules of docs/exactness.md, shared by the tests.

float64: max |Δlogit| <= 1e-9 · max|logit| and argmax identical at every real position.
float32: max |Δlogit| <= 5e-2 · max|logit| and argmax identical at >= 90% of real positions.
"""

from __future__ import annotations

import torch


def compare(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |a-b| / max|b|, top-1 agreement) over the real positions of (..., V) logits."""
    if real is not None:
        a, b = a[real], b[real]
    a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    rel = float((a - b).abs().max() / b.abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    return rel, agree


def assert_float64_rule(a, b, real=None) -> tuple[float, float]:
    rel, agree = compare(a, b, real)
    assert rel <= 1e-9, f"float64 rule: max relative difference {rel:.3e} > 1e-9"
    assert agree == 1.0, f"float64 rule: argmax differs at {100 * (1 - agree):.2f}% of positions"
    return rel, agree


def assert_float32_rule(a, b, real=None) -> tuple[float, float]:
    rel, agree = compare(a, b, real)
    assert rel <= 5e-2, f"float32 rule: max relative difference {rel:.3e} > 5e-2"
    assert agree >= 0.9, f"float32 rule: argmax agrees at only {100 * agree:.1f}% of positions"
    return rel, agree


def assert_rule(dtype: torch.dtype, a, b, real=None) -> tuple[float, float]:
    return (assert_float64_rule if dtype == torch.float64 else assert_float32_rule)(a, b, real)


def right_padded_mask(lengths: list[int], seq: int) -> torch.Tensor:
    return (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
