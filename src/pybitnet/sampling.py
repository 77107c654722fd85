"""Choosing the next token from logits: pure functions plus one seeded torch.Generator, no model, no text.

Order (as in transformers): repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 is greedy: the argmax of the penalised logits (lowest id on ties), with no randomness used.
Filters mark removed tokens with -inf so that every step works on one [B, V] tensor for the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the prompt or the output

    def __post_init__(self) -> None:
        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if finite("temperature") < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < finite("top_p") <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= finite("min_p") < 1:
            raise InputError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if finite("repetition_penalty") <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG for sampling: seeded runs repeat exactly and never touch torch's global RNG."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {seed!r}")
        generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied by `penalty`.

    logits: (B, V) float; seen: (B, V) bool, True where the row's prompt or output holds the token.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest logits (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one per row)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the first token always has mass_before 0 < p, so it stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, -math.inf)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row: logits (B, V) -> LongTensor (B,). `seen` (B, V) bool feeds the repetition penalty."""
    if logits.dim() != 2:
        raise InputError(f"sample expects logits of shape (batch, vocab), got {tuple(logits.shape)}")
    if params.repetition_penalty != 1.0:
        if seen is None or seen.shape != logits.shape:
            raise InputError("repetition_penalty needs `seen`, a bool tensor of the logits' shape")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    if generator is None:
        raise InputError("sampling with temperature > 0 needs a torch.Generator (see make_generator)")
    logits = apply_temperature(logits.float(), params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Record tokens (B,) or (B, T) as seen in the (B, V) bool mask, in place; returns the mask."""
    index = tokens.view(tokens.shape[0], -1).to(seen.device)
    return seen.scatter_(1, index, True)
