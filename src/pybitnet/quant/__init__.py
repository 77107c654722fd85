"""Quantization: per-token int8 activations, absmean ternarization, and the on-disk ternary layouts."""

from .activations import quantize_activations
from .ternary import absmean_ternarize

__all__ = ["quantize_activations", "absmean_ternarize"]
