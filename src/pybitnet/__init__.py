"""pybitnet: fast, exact inference for BitNet b1.58 (ternary weight, int8 activation) language models."""

from . import synthetic
from .cache import KVCache
from .config import PRESETS, ModelConfig, preset
from .errors import CacheError, CheckpointError, ConfigError, GGUFError, InputError, PyBitNetError
from .loaders import load, load_tokenizer
from .model import Transformer
from .session import Conversation, Session, Snapshot
from .weights import TernaryWeight

__version__ = "0.1.0"

__all__ = [
    "load", "load_tokenizer", "synthetic", "Transformer", "Session", "Conversation", "Snapshot", "ModelConfig",
    "PRESETS", "preset", "KVCache", "TernaryWeight",
    "PyBitNetError", "ConfigError", "CheckpointError", "GGUFError", "CacheError", "InputError",
]
