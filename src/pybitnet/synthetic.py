"""Random models with real shapes and realistic scales, and a tokenizer for them: benchmarks, tests
and first tries need no download.

Ternary values follow what absmean-ternarizing a normal init gives: |W| < β/2 with β = σ·√(2/π)
means P(0) = 2Φ(0.399) − 1 ≈ 0.31, the rest split evenly between ±1. Norm weights are ≈ 1.

Building a model of a real shape takes seconds to minutes (the 2B-4T shape draws 2.4 billion random
values): `random_weights` reports its progress to a callback, given directly or set for a block of code
with `reporting_progress` (which is how `pybitnet.load("synthetic:...")` under the command line shows it).

The synthetic tokenizer is byte-level: one token per UTF-8 byte, the preset's BOS/EOS ids as special
tokens, every other id an unused placeholder. It is built the way a GGUF file's byte-level BPE vocabulary
is (tokenizer.py), so it survives conversion to GGUF and to a Hugging Face directory unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch

from . import kernels
from .config import ModelConfig, preset
from .errors import ConfigError
from .tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, Tokenizer, byte_level_alphabet
from .weights import TernaryWeight, Weights, expected_shapes, is_projection

INIT_STD = 0.02
EMBED_STD = 0.1  # logits of a normed hidden state then spread over a few units, as in trained models
# byte thresholds for -1 / 0 / +1 with probabilities 88/256, 80/256, 88/256 (≈ .344, .313, .344)
_NEG_BELOW, _ZERO_BELOW = 88, 168


# Rows generated at a time: temporaries stay small, so building a 2 GB model leaves no large
# freed holes behind (they would stay resident and inflate peak RSS).
_ROWS = 256


# progress(done, total, part): `done` of `total` weight values drawn, `part` the tensor under way
# ("embed_tokens", "layer 3/30", ...). Called after every block of rows, so at least every few seconds.
BuildProgress = Callable[[int, int, str], None]

_PROGRESS: contextvars.ContextVar[BuildProgress | None] = contextvars.ContextVar("pybitnet_build_progress",
                                                                                 default=None)


@contextlib.contextmanager
def reporting_progress(progress: BuildProgress | None) -> Iterator[None]:
    """Within the block, `random_weights` called without a callback of its own reports to `progress`."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _ternary(shape: tuple[int, int], gen: torch.Generator, advance: Callable[[int], None]) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.int8)
    for start in range(0, shape[0], _ROWS):
        u = torch.randint(0, 256, (min(_ROWS, shape[0] - start), shape[1]), generator=gen, dtype=torch.uint8)
        out[start : start + u.shape[0]] = (u >= _NEG_BELOW).to(torch.int8) + (u >= _ZERO_BELOW).to(torch.int8) - 1
        advance(u.numel())
    return out


def _normal(shape: tuple[int, int], std: float, dtype: torch.dtype, gen: torch.Generator,
            advance: Callable[[int], None]) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], _ROWS * 16):
        rows = min(_ROWS * 16, shape[0] - start)
        out[start : start + rows] = torch.randn(rows, shape[1], generator=gen).mul_(std)
        advance(rows * shape[1])
    return out


def _part(name: str, config: ModelConfig) -> str:
    """What a progress report calls the tensor `name`: its layer, or its own name outside the layers."""
    if name.startswith("layers."):
        return f"layer {int(name.split('.')[1]) + 1}/{config.num_layers}"
    return name


def random_weights(config: ModelConfig, seed: int = 0, embed_dtype: torch.dtype = torch.bfloat16,
                   progress: BuildProgress | None = None) -> Weights:
    """A deterministic weight set for `config` (same seed -> same weights). `progress` (default: the one
    set by `reporting_progress`, if any) hears how many values are drawn as the work goes."""
    progress = progress if progress is not None else _PROGRESS.get()
    shapes = expected_shapes(config)
    total = sum(math.prod(shape) for shape in shapes.values())
    done, part = 0, ""

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total, part)

    gen = torch.Generator().manual_seed(seed)
    beta = INIT_STD * math.sqrt(2 / math.pi)
    weights: Weights = {}
    for name, shape in shapes.items():
        part = _part(name, config)
        if is_projection(name):
            # spread the per-tensor scales a little, as trained checkpoints have them
            scale = beta * (0.75 + 0.5 * torch.rand((), generator=gen).item())
            # packed as it is made, like a loaded checkpoint: no int8 copy of the whole model exists
            weights[name] = TernaryWeight(_ternary(shape, gen, advance), scale).packed_form()
        elif name in ("embed_tokens", "lm_head"):
            weights[name] = _normal(shape, EMBED_STD, embed_dtype, gen, advance)
        else:  # norms ≈ 1
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            advance(math.prod(shape))
    return weights


def random_model(preset_or_config: str | ModelConfig = "tiny", seed: int = 0, num_layers: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 backend: str = kernels.AUTO, progress: BuildProgress | None = None):
    """A Transformer with random ternary weights for a preset name or a ModelConfig (`progress`: see
    `random_weights`; drawing the weights is nearly all of the time)."""
    from .model import Transformer

    config = preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if num_layers is not None:
        config = config.replace(num_layers=num_layers)
    return Transformer(config, random_weights(config, seed, progress=progress), dtype=dtype, device=device,
                       backend=backend, release_weights=True)


# names of the special tokens, LLaMA-3's, by their place in (bos, first eos, second eos)
_SPECIAL_NAMES = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def synthetic_tokenizer_metadata(config: ModelConfig) -> dict:
    """The synthetic tokenizer as GGUF `tokenizer.ggml.*` metadata (a byte-level BPE without merges)."""
    specials: dict[int, str] = {}
    if config.bos_token_id is not None:
        specials[config.bos_token_id] = _SPECIAL_NAMES[0]
    for i, token_id in enumerate(config.eos_token_ids):
        specials.setdefault(token_id, _SPECIAL_NAMES[1 + i] if i < 2 else f"<|end_{i}|>")
    alphabet = byte_level_alphabet()  # (256,) the character standing for each byte
    if config.vocab_size < len(alphabet) + len(specials):
        raise ConfigError(f"vocab_size {config.vocab_size} is too small for the synthetic byte-level tokenizer "
                          f"({len(alphabet)} bytes + {len(specials)} special tokens)")
    tokens, types = [], []
    next_byte = iter(alphabet)
    for token_id in range(config.vocab_size):
        if token_id in specials:
            tokens.append(specials[token_id])
            types.append(TOKEN_CONTROL)
        elif (char := next(next_byte, None)) is not None:
            tokens.append(char)
            types.append(TOKEN_NORMAL)
        else:
            tokens.append(f"<|unused_{token_id}|>")
            types.append(TOKEN_UNUSED)
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.merges": [], "tokenizer.ggml.add_bos_token": config.bos_token_id is not None}
    ids = {"tokenizer.ggml.bos_token_id": config.bos_token_id,
           "tokenizer.ggml.eos_token_id": config.eos_token_ids[0] if config.eos_token_ids else None,
           "tokenizer.ggml.eot_token_id": config.eos_token_ids[1] if len(config.eos_token_ids) > 1 else None}
    metadata.update({key: value for key, value in ids.items() if value is not None})
    return metadata


def synthetic_tokenizer(config: ModelConfig | str = "tiny") -> Tokenizer:
    """The tokenizer of `synthetic:` models of this preset or config (same config -> same tokenizer)."""
    config = preset(config) if isinstance(config, str) else config
    return Tokenizer.from_gguf_metadata(synthetic_tokenizer_metadata(config), source="synthetic tokenizer")
