"""Checkpoint loaders: a MODEL spec in, (ModelConfig, Weights) out; `load` builds the model.

spec.py resolves specs, load.py loads them, hf.py and gguf.py read and write the two file formats,
names.py maps their tensor names, convert.py writes any model as either format.
"""

from .convert import convert
from .load import load, load_weights
from .spec import ModelSpec, resolve_model_spec

__all__ = ["load", "load_weights", "convert", "resolve_model_spec", "ModelSpec"]
