"""The output projection (lm_head): final-normed hidden states -> logits over the vocabulary."""

from __future__ import annotations

import torch
from torch import nn

# A bf16/f16 head is computed in fp32 this many vocabulary rows at a time.
LM_HEAD_ROWS = 1024


class LMHead(nn.Module):
    """logits = h @ Wᵀ with W kept in its checkpoint dtype (bf16 for 2B-4T: half the memory of fp32).

    A 16-bit W is widened LM_HEAD_ROWS rows at a time into an fp32 buffer, so logits are exact fp32
    products (a bf16 GEMM on CPU would round its output to bf16) without a float copy of the whole
    vocabulary matrix. The buffer belongs to the call, not the module: several threads may run the
    same model at once.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (V, H)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (M, H) -> (M, V) in h's dtype."""
        if self.weight.dtype == h.dtype:
            return h @ self.weight.t()
        vocab, width = self.weight.shape
        rows_buffer = torch.empty(min(LM_HEAD_ROWS, vocab), width, dtype=h.dtype, device=h.device)  # (R, H)
        out = torch.empty(h.shape[0], vocab, dtype=h.dtype, device=h.device)  # (M, V)
        for start in range(0, vocab, LM_HEAD_ROWS):
            n = min(LM_HEAD_ROWS, vocab - start)
            rows = rows_buffer[:n].copy_(self.weight[start : start + n])
            target = out[:, start : start + n]  # (M, n)
            if target.is_contiguous():  # one row: write in place
                torch.mm(h, rows.t(), out=target)
            else:
                target.copy_(h @ rows.t())
        return out
