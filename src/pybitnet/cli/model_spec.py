"""MODEL arguments -> a model and its tokenizer, the one place the command line resolves them.

A MODEL is a Hugging Face checkpoint directory, a .gguf file, a Hugging Face repo id, or
`synthetic:PRESET[:LAYERS]`; the library's loaders understand every form (pybitnet.loaders.spec),
so the commands only pick the dtype and backend and leave the rest to them.
"""

from __future__ import annotations

import torch

from pathlib import Path

from .. import kernels
from ..loaders.spec import BUILTIN, REPO_ID, SYNTHETIC_PREFIX  # noqa: F401  (SYNTHETIC_PREFIX: for commands)
from .options import parse_dtype


def names_a_model(text: str) -> bool:
    """Whether a positional argument is a MODEL rather than a prompt or a document: `builtin`, a
    synthetic spec, a directory, a .gguf file, or a repo id that is no file here."""
    if text == BUILTIN or text.startswith(SYNTHETIC_PREFIX):
        return True
    path = Path(text)
    if path.is_dir() or path.suffix.lower() == ".gguf":
        return True
    return not path.exists() and REPO_ID.match(text) is not None


def split_model(arguments: list[str]) -> tuple[str, list[str]]:
    """(MODEL, the other positionals) for commands whose MODEL may be omitted: a first argument that
    names a model is the MODEL, otherwise the built-in model is."""
    if arguments and names_a_model(arguments[0]):
        return arguments[0], arguments[1:]
    return BUILTIN, arguments


def open_model(spec: str, dtype: str | torch.dtype = "float32", backend: str = kernels.AUTO):
    """The model a MODEL argument names, with float work in `dtype`."""
    from .. import load

    return load(spec, dtype=dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype), backend=backend)


def open_tokenizer(spec: str):
    """The tokenizer of the model a MODEL argument names; CheckpointError naming the path when it has none."""
    from ..loaders import load_tokenizer

    return load_tokenizer(spec)
