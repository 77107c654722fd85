"""Cross-entropy over a large vocabulary without a (tokens, V) float tensor: the logits are made,
used and dropped one vocabulary chunk at a time, forward (online log-sum-exp) and backward."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        """hidden (M, H), weight (V, H), targets (M,) -> mean over non-ignored rows of lse - logit[target]."""
        rows = hidden.shape[0]
        valid = targets != IGNORE_INDEX  # (M,)
        safe = torch.where(valid, targets, 0)
        running_max = torch.full((rows,), -torch.inf, dtype=hidden.dtype, device=hidden.device)  # (M,)
        running_sum = torch.zeros(rows, dtype=hidden.dtype, device=hidden.device)  # (M,)
        target_logit = torch.zeros(rows, dtype=hidden.dtype, device=hidden.device)  # (M,)
        for start in range(0, weight.shape[0], chunk):
            logits = hidden @ weight[start : start + chunk].t()  # (M, C)
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            running_sum = running_sum * (running_max - new_max).exp() + (logits - new_max[:, None]).exp().sum(dim=1)
            running_max = new_max
            inside = (safe >= start) & (safe < start + logits.shape[1])
            picked = logits.gather(1, (safe - start).clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
            target_logit = torch.where(inside, picked, target_logit)
        lse = running_max + running_sum.log()  # (M,)
        count = valid.sum().clamp(min=1)
        # A vocabulary that fits one chunk keeps its logits for the backward instead of recomputing them.
        kept = logits if weight.shape[0] <= chunk else None
        ctx.save_for_backward(hidden, weight, safe, valid, lse, kept)
        ctx.chunk, ctx.count = chunk, count
        return ((lse - target_logit) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe, valid, lse, kept = ctx.saved_tensors
        scale = (grad_loss / ctx.count) * valid.to(hidden.dtype)  # (M,)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for start in range(0, weight.shape[0], ctx.chunk):
            block = weight[start : start + ctx.chunk]  # (C, H)
            logits = kept if kept is not None else hidden @ block.t()  # (M, C)
            probs = (logits - lse[:, None]).exp_()  # softmax restricted to the chunk
            inside = (safe >= start) & (safe < start + block.shape[0])
            probs[rows[inside], safe[inside] - start] -= 1.0
            probs.mul_(scale[:, None])
            if grad_hidden is not None:
                grad_hidden.addmm_(probs, block)
            if grad_weight is not None:
                grad_weight[start : start + block.shape[0]] = probs.t() @ hidden
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 8192) -> torch.Tensor:
    """Mean cross-entropy of logits hidden @ weightᵀ against targets, never holding more than (M, chunk) logits.

    hidden (M, H), weight (V, H), targets (M,) int64 with IGNORE_INDEX for positions not scored."""
    return _ChunkedCrossEntropy.apply(hidden, weight, targets.long(), int(chunk))
