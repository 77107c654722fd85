"""Choosing the next token from logits: pure functions plus one seeded torch.Generator, no model, no text.

Order (as in transformers): repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 is greedy: the argmax of the penalised logits (lowest id on ties), with no randomness used; so is a
temperature below float32's smallest normal number, which leaves nothing but the argmax to draw anyway.
Filters mark removed tokens with -inf so that every step works on one [B, V] tensor for the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError

# Below this (float32's smallest normal number) a temperature is read as 0: dividing by it is no longer meaningful
# in the float32 the logits are scaled in, and every token but the most likely one would get probability 0.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


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
        return self.temperature < GREEDY_BELOW


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
    index, probs = candidate_distribution(logits, params)  # (B, C) token ids and their (unnormalised) weights
    choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1) position among candidates
    return index.gather(-1, choice).squeeze(-1)


# Without top-k, top-p/min-p first look at this many most likely tokens: sorting a 128k vocabulary costs ~10 ms
# a token, the top 1024 almost always hold the kept set, and when they do not the full path runs instead.
CANDIDATES = 1024


def candidate_distribution(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """What `sample` draws from: token ids (B, C) and weights (B, C), zero for filtered tokens.

    Equal (up to normalisation) to softmax of the filter chain temperature -> top-k -> top-p -> min-p over the
    whole vocabulary, computed on the few most likely tokens when they provably contain every kept token.
    """
    logits = logits.float()
    # the row maximum first: scaled by a tiny temperature, logits then go to -inf (probability 0), never to +inf
    logits = apply_temperature(logits - logits.amax(-1, keepdim=True), params.temperature)  # (B, V), max 0
    batch, vocab = logits.shape
    filtered = params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
    if filtered:
        k = min(params.top_k if params.top_k > 0 else CANDIDATES, vocab)
        values, index = torch.topk(logits, k, dim=-1)  # (B, k), most likely first
        if params.top_k > 0:
            # top-k keeps every token tied with the k-th; topk returned only k of them
            exact = k == vocab or bool((logits >= values[:, -1:]).sum(-1).le(k).all())
            probs = torch.softmax(values, dim=-1)  # renormalised over the top k, as the filter chain does
        else:
            probs = torch.exp(values - torch.logsumexp(logits, dim=-1, keepdim=True))  # full-vocabulary probs
            exact = k == vocab or _kept_set_inside(probs, params)
        if exact:
            probs = _top_p_min_p_sorted(probs, params)
            return index, probs
    # General path: filters over the whole vocabulary.
    logits = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
    logits = min_p_filter(logits, params.min_p)
    index = torch.arange(vocab, device=logits.device).expand(batch, vocab)
    return index, torch.softmax(logits, dim=-1)


def _kept_set_inside(probs: torch.Tensor, params: SamplingParams) -> bool:
    """Whether every token outside these candidates (probs (B, C), descending, full-vocabulary) is dropped."""
    covered = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    if params.top_p < 1.0:  # a token after the candidates has at least their mass ranked above it
        covered |= probs.sum(-1) >= params.top_p
    if params.min_p > 0.0:  # a token after the candidates is no likelier than the last candidate
        covered |= probs[:, -1] < params.min_p * probs[:, 0]
    return bool(covered.all())


def _top_p_min_p_sorted(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """top-p then min-p on descending probabilities (B, C); filtered entries become 0."""
    if params.top_p < 1.0:
        # probs sum to 1 after top-k, and are full-vocabulary probabilities otherwise: either way the mass
        # ranked above a candidate is the sum of the candidates before it
        mass_before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(mass_before >= params.top_p, 0.0)
    if params.min_p > 0.0:  # min-p on the top-p survivors: renormalising scales all alike, so compare raw
        probs = probs.masked_fill(probs < params.min_p * probs[:, :1], 0.0)
    return probs


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Record tokens (B,) or (B, T) as seen in the (B, V) bool mask, in place; returns the mask."""
    index = tokens.view(tokens.shape[0], -1).to(seen.device)
    return seen.scatter_(1, index, True)
