"""forward_full's `logits` argument picks positions: an index tensor gives exactly those rows of the full
logits, and an empty index an empty result rather than a failed reshape."""

from __future__ import annotations

import torch

from pybitnet import synthetic
from rules import assert_float64_rule


def test_logit_index_selects_rows_of_the_full_logits_and_may_be_empty():
    model = synthetic.random_model("tiny", seed=3, num_layers=1, dtype=torch.float64)
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))  # (B, T)
    full = model.forward_full(tokens)  # (B, T, V)
    index = torch.tensor([0, 4, 8])
    assert_float64_rule(model.forward_full(tokens, logits=index), full[:, index])  # a GEMM of fewer rows
    empty = model.forward_full(tokens, logits=torch.tensor([], dtype=torch.long))
    assert empty.shape == (2, 0, model.config.vocab_size) and empty.dtype == full.dtype
