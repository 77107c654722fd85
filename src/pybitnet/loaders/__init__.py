"""Checkpoint loaders: a path in, (ModelConfig, Weights) out; `load` builds the model."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import kernels
from ..config import ModelConfig
from ..errors import CheckpointError
from ..weights import Weights


def load_weights(path: str | Path) -> tuple[ModelConfig, Weights, dict]:
    """(config, weights, info) from an HF directory or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        from .hf import load_hf_weights

        return load_hf_weights(path)
    if path.suffix.lower() == ".gguf":
        from .gguf import load_gguf_weights

        config, weights = load_gguf_weights(path)[:2]
        return config, weights, {"format": "gguf"}
    raise CheckpointError(f"{path}: not a model directory (config.json + *.safetensors) or a .gguf file")


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         backend: str = kernels.AUTO, lm_head: str = "exact"):
    """Load a checkpoint (HF directory or .gguf file) as a ready-to-run Transformer.
    `lm_head="int8"` trades exact logits for a faster, smaller output projection (see head.py)."""
    from ..model import Transformer

    config, weights, info = load_weights(path)
    model = Transformer(config, weights, dtype=dtype, device=device, backend=backend, release_weights=True,
                        lm_head=lm_head)
    model.source = {"path": str(path), **info}
    return model
