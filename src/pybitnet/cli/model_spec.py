"""MODEL arguments -> a model and its tokenizer, for every command.

A MODEL is `builtin`, a Hugging Face checkpoint directory, a .gguf file, a Hugging Face repo id, or
`synthetic:PRESET[:LAYERS]`; the loaders resolve every form (`pybitnet.load`, `pybitnet.load_tokenizer`),
so the commands only pick the dtype and backend and leave the rest to them.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..loaders import load, load_tokenizer
from ..loaders.spec import BUILTIN, SYNTHETIC_PREFIX, names_a_model  # noqa: F401  (for commands)
from .options import parse_dtype


def split_model(arguments: list[str]) -> tuple[str, list[str]]:
    """(MODEL, the other positionals) for commands whose MODEL may be omitted: a first argument that
    names a model is the MODEL, otherwise the built-in model is."""
    if arguments and names_a_model(arguments[0]):
        return arguments[0], arguments[1:]
    return BUILTIN, arguments


def open_model(spec: str, dtype: str | torch.dtype = "float32", backend: str = kernels.AUTO, lm_head: str = "exact"):
    """The model a MODEL argument names, with float work in `dtype` (a torch dtype or its name) and the output
    head `lm_head` (head.HEAD_MODES)."""
    return load(spec, dtype=dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype), backend=backend,
                lm_head=lm_head)


# The tokenizer of the model a MODEL argument names; CheckpointError naming the path when it has none.
open_tokenizer = load_tokenizer
