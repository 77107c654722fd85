"""MODEL arguments -> a model and its tokenizer, the one place the command line resolves them.

A MODEL is a Hugging Face checkpoint directory, a .gguf file, a Hugging Face repo id, or
`synthetic:PRESET[:LAYERS]`; the library's loaders understand every form, so the commands only pick
the dtype and backend and leave the rest to them.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..config import preset
from ..errors import InputError
from .options import parse_dtype

SYNTHETIC_PREFIX = "synthetic:"


def parse_synthetic(spec: str) -> tuple[str, int | None]:
    """(preset name, layers or None) of `synthetic:PRESET[:LAYERS]`; InputError naming what is wrong."""
    name, _, layers = spec[len(SYNTHETIC_PREFIX):].partition(":")
    preset(name)  # ConfigError listing the known presets
    if not layers:
        return name, None
    if not layers.isdigit() or int(layers) < 1:
        raise InputError(f"{spec}: LAYERS in synthetic:PRESET[:LAYERS] must be an integer >= 1, got {layers!r}")
    return name, int(layers)


def open_model(spec: str, dtype: str | torch.dtype = "float32", backend: str = kernels.AUTO):
    """The model a MODEL argument names, with float work in `dtype`."""
    from .. import load, synthetic

    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)
    if spec.startswith(SYNTHETIC_PREFIX):
        name, layers = parse_synthetic(spec)
        return synthetic.random_model(name, seed=0, num_layers=layers, dtype=torch_dtype, backend=backend)
    return load(spec, dtype=torch_dtype, backend=backend)


def open_tokenizer(spec: str):
    """The tokenizer of the model a MODEL argument names; CheckpointError naming the path when it has none."""
    from ..tokenizer import load_tokenizer

    return load_tokenizer(spec)
