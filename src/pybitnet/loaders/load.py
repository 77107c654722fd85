"""`load`, `load_weights` and `load_tokenizer`: any MODEL spec (loaders/spec.py) in, a model, its weights or
its tokenizer out. The one way from a spec to what it names: the command line, corpus scoring and the Ray
workers all come through here."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import kernels, runtime
from ..config import ModelConfig
from ..head import check_head_mode
from ..tokenizer import Tokenizer
from ..weights import Weights
from .spec import BUILTIN, resolve_model_spec

SYNTHETIC_SEED = 0  # synthetic:PRESET specs always name the same weights


def load_weights(spec: str | os.PathLike = BUILTIN, lm_head: str = "exact") -> tuple[ModelConfig, Weights, dict]:
    """(config, weights, info) of an HF directory, a .gguf file, `synthetic:PRESET[:LAYERS]`, a Hub repo id,
    or `builtin` (the default: the small trained model shipped with the package).

    A block `lm_head` mode (q8_0, q6_k, q4_k: head.py) has the file loaders return the table the head runs over
    in that block type, quantized from the file's rows a chunk at a time; synthetic weights, drawn in memory,
    stay float (the model quantizes them)."""
    check_head_mode(lm_head)
    model = resolve_model_spec(spec)
    hub = {"repo_id": model.repo_id} if model.repo_id else {}
    if model.kind == "synthetic":
        from ..synthetic import random_weights

        return model.config, random_weights(model.config, SYNTHETIC_SEED), {"format": "synthetic",
                                                                            "seed": SYNTHETIC_SEED}
    if model.kind == "hf":
        from .hf import load_hf_weights

        config, weights, info = load_hf_weights(model.path, lm_head)
        return config, weights, {**info, **hub}
    from .gguf import load_gguf_weights

    config, weights = load_gguf_weights(model.path, lm_head)
    return config, weights, {"format": "gguf", **hub}


def load(spec: str | os.PathLike = BUILTIN, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         backend: str = kernels.AUTO, lm_head: str = "exact"):
    """A ready-to-run Transformer for any MODEL spec (see `load_weights`).
    `lm_head` (head.py): "exact" (default) runs the output table as the file holds it; "int8" trades exact
    logits for a faster, smaller output projection; "q8_0", "q6_k" and "q4_k" quantize a float output table
    (tied: the embedding too) to ggml's blocks at load and keep only the blocks."""
    from ..model import Transformer, check_dtype

    check_dtype(dtype)  # before reading gigabytes of weights
    with runtime.loading():  # temporaries in mappings of their own: no holes left between the tensors kept
        config, weights, info = load_weights(spec, lm_head)
        model = Transformer(config, weights, dtype=dtype, device=device, backend=backend, release_weights=True,
                            lm_head=lm_head)
    model.source = {"path": os.fspath(spec), **info}
    return model


def load_tokenizer(spec: str | os.PathLike = BUILTIN) -> Tokenizer:
    """The tokenizer of a MODEL spec: an HF directory (or a file inside one), a .gguf file,
    `synthetic:PRESET[:LAYERS]` (the synthetic byte-level tokenizer), a Hub repo id, or `builtin`.

    Raises CheckpointError naming the path when the model carries no tokenizer.
    """
    path = Path(spec)
    if path.is_file() and path.suffix.lower() != ".gguf":
        return Tokenizer.from_hf_dir(path.parent)  # tokenizer.json or another file of the directory
    model = resolve_model_spec(spec)
    if model.kind == "synthetic":
        from ..synthetic import synthetic_tokenizer

        return synthetic_tokenizer(model.config)
    if model.kind == "gguf":
        from .gguf_file import read_gguf_metadata

        return Tokenizer.from_gguf_metadata(read_gguf_metadata(model.path), source=str(model.path))
    return Tokenizer.from_hf_dir(model.path)
