"""The engine's own exception types: every message names the offending file, tensor, shape or value."""


class PyBitNetError(Exception):
    """Base class of every error pybitnet raises on purpose."""


class ConfigError(PyBitNetError, ValueError):
    """A model configuration that is unknown, inconsistent or unsupported."""


class CheckpointError(PyBitNetError, ValueError):
    """A checkpoint on disk that is missing, truncated or holds tensors of the wrong name/shape/values."""


class GGUFError(CheckpointError):
    """A GGUF container that cannot be read (bad magic, version, offsets, types)."""


class CacheError(PyBitNetError, ValueError):
    """A KV-cache request beyond what the cache was allocated for."""


class InputError(PyBitNetError, ValueError):
    """Bad arguments to a forward pass, scorer or sampler (shape, dtype, range, empty input)."""
