"""MODEL arguments -> a model and its tokenizer, the one place the command line resolves them.

A MODEL is a Hugging Face checkpoint directory, a .gguf file, a Hugging Face repo id, or
`synthetic:PRESET[:LAYERS]`; the library's loaders understand every form (pybitnet.loaders.spec),
so the commands only pick the dtype and backend and leave the rest to them.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..loaders.spec import SYNTHETIC_PREFIX  # noqa: F401  (for commands that treat synthetic models apart)
from .options import parse_dtype


def open_model(spec: str, dtype: str | torch.dtype = "float32", backend: str = kernels.AUTO):
    """The model a MODEL argument names, with float work in `dtype`."""
    from .. import load

    return load(spec, dtype=dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype), backend=backend)


def open_tokenizer(spec: str):
    """The tokenizer of the model a MODEL argument names; CheckpointError naming the path when it has none."""
    from ..tokenizer import load_tokenizer

    return load_tokenizer(spec)
