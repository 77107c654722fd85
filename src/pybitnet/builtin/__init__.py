"""The built-in model: a small BitNet b1.58 trained with `pybitnet train`, shipped inside the package
so that generation, chat and perplexity work on a fresh install with no download.

Its corpus, recipe, held-out perplexity and sample generations are in docs/builtin-model.md.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

# HF packed safetensors (config.json, model.safetensors) + tokenizer files
BUILTIN_MODEL = Path(__file__).resolve().parent / "model"


def builtin_model_path() -> Path:
    """The directory of the built-in model; CheckpointError when the installed package lacks its files."""
    if not (BUILTIN_MODEL / "config.json").is_file() or not (BUILTIN_MODEL / "model.safetensors").is_file():
        raise CheckpointError(f"the built-in model is missing from this installation (expected it in {BUILTIN_MODEL})")
    return BUILTIN_MODEL
