"""Scoring and perplexity: token log-probs chunk by chunk, never a (T, vocab) tensor for a whole text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import InputError

# Rows of hidden state projected to the vocabulary at once: 256 x 128256 fp32 = 131 MB at most.
PROJECT_ROWS = 256


def _one_sequence(tokens) -> torch.Tensor:
    """Token ids as a 1-D LongTensor: (T,) or (1, T) integer input, else InputError."""
    tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise InputError(f"token ids must be integers, got {tokens.dtype}")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise InputError(f"scoring takes one sequence of shape (T,) or (1, T), got {tuple(tokens.shape)}")
    return tokens.long()


def _targets_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden (N, H), targets (N,) -> log p(target) (N,) in float64, PROJECT_ROWS rows at a time."""
    out = torch.empty(targets.shape[0], dtype=torch.float64)
    for s in range(0, hidden.shape[0], PROJECT_ROWS):
        logits = model.project(hidden[s : s + PROJECT_ROWS]).double()  # (n, V)
        logp = logits.log_softmax(dim=-1)
        out[s : s + logits.shape[0]] = logp.gather(1, targets[s : s + PROJECT_ROWS, None].to(logp.device))[:, 0].cpu()
    return out


def token_logprobs(model, tokens: torch.Tensor | list[int], *, chunk_size: int | None = None) -> torch.Tensor:
    """log p(tokens[t] | tokens[:t]) for t = 1..T-1, shape (T-1,), float64, via the full-sequence path."""
    tokens = _one_sequence(tokens)
    if tokens.numel() < 2:
        raise InputError(f"scoring needs at least 2 tokens (the first one is only context), got {tokens.numel()}")
    out = []
    with torch.no_grad():
        for start, hidden in model.hidden_states(tokens[None], chunk_size=chunk_size):
            n = hidden.shape[1]
            targets = tokens[start + 1 : start + n + 1]  # the next token of each position, if any
            out.append(_targets_logprobs(model, hidden[0, : targets.shape[0]], targets))
    return torch.cat(out)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    windows: int


def perplexity_windows(num_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first_target, end) of each window: tokens[begin:end] go through the model and
    targets first_target..end-1 are scored, each predicted from tokens[begin:target].

    The targets of the windows are 1..num_tokens-1, each exactly once. The first window is
    tokens[:ctx]; each later one scores the next `stride` targets (at most ctx - 1, all a window of
    ctx tokens can predict) and reaches back ctx tokens from its last one, so every target has at
    least ctx - stride tokens of context, or all before it.
    """
    step = min(stride, ctx - 1)
    end = min(ctx, num_tokens)
    windows = [(0, 1, end)]
    while end < num_tokens:
        first, end = end, min(end + step, num_tokens)
        windows.append((max(0, end - ctx), first, end))
    return windows


def perplexity(model, tokens: torch.Tensor | list[int], *, ctx: int = 2048, stride: int | None = None,
               chunk_size: int | None = None, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity over windows of at most `ctx` tokens that score `stride` (default
    ctx) new tokens each: every token but the first is scored exactly once, with as much left
    context as its window gives (`perplexity_windows`). With ctx >= len(tokens) it is one pass."""
    tokens = _one_sequence(tokens)
    stride = stride or ctx
    if ctx < 2 or stride < 1 or stride > ctx:
        raise InputError(f"perplexity needs ctx >= 2 and 1 <= stride <= ctx, got ctx={ctx}, stride={stride}")
    if tokens.numel() < 2:
        raise InputError(f"perplexity needs at least 2 tokens, got {tokens.numel()}")
    windows = perplexity_windows(tokens.numel(), ctx, stride)
    total, count = 0.0, 0
    for i, (begin, first_target, end) in enumerate(windows):
        logp = token_logprobs(model, tokens[begin:end], chunk_size=chunk_size)  # predicts tokens[begin+1:end]
        new = logp[first_target - begin - 1 :]
        total -= float(new.sum())
        count += new.numel()
        if progress:
            progress(i + 1, len(windows))
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(windows))
