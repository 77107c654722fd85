"""Checkpoint loaders: the one way in from a MODEL spec. `load` builds its model, `load_tokenizer` its
tokenizer, `load_weights` gives (ModelConfig, Weights).

spec.py resolves specs, load.py loads them (model, weights, tokenizer), hf.py and gguf.py read and write
the two file formats, names.py maps their tensor names, convert.py writes any model as either format.
"""

from .convert import convert
from .load import load, load_tokenizer, load_weights
from .spec import ModelSpec, resolve_model_spec

__all__ = ["load", "load_tokenizer", "load_weights", "convert", "resolve_model_spec", "ModelSpec"]
