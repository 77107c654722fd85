"""Random models with real shapes and realistic scales: benchmarks and tests need no download.

Ternary values follow what absmean-ternarizing a normal init gives: |W| < β/2 with β = σ·√(2/π)
means P(0) = 2Φ(0.399) − 1 ≈ 0.31, the rest split evenly between ±1. Norm weights are ≈ 1.
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .config import ModelConfig, preset
from .weights import TernaryWeight, Weights, expected_shapes

INIT_STD = 0.02
EMBED_STD = 0.1  # logits of a normed hidden state then spread over a few units, as in trained models
# byte thresholds for -1 / 0 / +1 with probabilities 88/256, 80/256, 88/256 (≈ .344, .313, .344)
_NEG_BELOW, _ZERO_BELOW = 88, 168


# Rows generated at a time: temporaries stay small, so building a 2 GB model leaves no large
# freed holes behind (they would stay resident and inflate peak RSS).
_ROWS = 256


def _ternary(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.int8)
    for start in range(0, shape[0], _ROWS):
        u = torch.randint(0, 256, (min(_ROWS, shape[0] - start), shape[1]), generator=gen, dtype=torch.uint8)
        out[start : start + u.shape[0]] = (u >= _NEG_BELOW).to(torch.int8) + (u >= _ZERO_BELOW).to(torch.int8) - 1
    return out


def _normal(shape: tuple[int, int], std: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], _ROWS * 16):
        rows = min(_ROWS * 16, shape[0] - start)
        out[start : start + rows] = torch.randn(rows, shape[1], generator=gen).mul_(std)
    return out


def random_weights(config: ModelConfig, seed: int = 0, embed_dtype: torch.dtype = torch.bfloat16) -> Weights:
    """A deterministic weight set for `config` (same seed -> same weights)."""
    gen = torch.Generator().manual_seed(seed)
    beta = INIT_STD * math.sqrt(2 / math.pi)
    weights: Weights = {}
    for name, shape in expected_shapes(config).items():
        kind = name.rsplit(".", 1)[-1]
        if kind.endswith("_proj"):
            # spread the per-tensor scales a little, as trained checkpoints have them
            scale = beta * (0.75 + 0.5 * torch.rand((), generator=gen).item())
            weights[name] = TernaryWeight(_ternary(shape, gen), scale)
        elif name in ("embed_tokens", "lm_head"):
            weights[name] = _normal(shape, EMBED_STD, embed_dtype, gen)
        else:  # norms ≈ 1
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return weights


def random_model(preset_or_config: str | ModelConfig = "tiny", seed: int = 0, num_layers: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 backend: str = kernels.AUTO):
    """A Transformer with random ternary weights for a preset name or a ModelConfig."""
    from .model import Transformer

    config = preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if num_layers is not None:
        config = config.replace(num_layers=num_layers)
    return Transformer(config, random_weights(config, seed), dtype=dtype, device=device, backend=backend,
                       release_weights=True)
