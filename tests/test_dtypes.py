"""Model dtypes: float32 and float64 run; half precision is refused up front with a clear message."""

from __future__ import annotations

import pytest
import torch

import pybitnet
from pybitnet import ConfigError, Transformer, preset, synthetic
from pybitnet.synthetic import random_weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8, torch.complex64])
def test_half_and_non_float_dtypes_are_refused_naming_the_dtype(dtype):
    with pytest.raises(ConfigError, match=str(dtype).replace("torch.", "")):
        synthetic.random_model("tiny", seed=0, dtype=dtype)


def test_refusal_comes_before_any_weight_is_touched():
    weights = random_weights(preset("tiny"), seed=0)
    count = len(weights)
    with pytest.raises(ConfigError, match="float16"):
        Transformer(preset("tiny"), weights, dtype=torch.float16, release_weights=True)
    assert len(weights) == count  # nothing was consumed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_supported_dtypes_give_finite_logits_in_that_dtype(dtype):
    model = synthetic.random_model("tiny", seed=0, dtype=dtype)
    logits = model.forward_full(torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0)))
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()


def test_load_refuses_a_half_dtype_before_resolving_the_model():
    # The spec names nothing that exists: the dtype error must come first, before any file is read.
    with pytest.raises(ConfigError, match="bfloat16"):
        pybitnet.load("/nonexistent/model/dir", dtype=torch.bfloat16)
