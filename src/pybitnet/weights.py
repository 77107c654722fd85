"""The checkpoint-independent weight set that every loader produces and the model consumes.

Names are internal and format-free (`loaders/names.py` maps HF and GGUF names onto them):
    embed_tokens [V, H] float     lm_head [V, H] float (untied only)     norm [H]
    layers.N.input_layernorm [H]  layers.N.attn_sub_norm [Hq*D]  layers.N.post_attention_layernorm [H]
    layers.N.ffn_sub_norm [F]     layers.N.{q,k,v,o,gate,up,down}_proj -> TernaryWeight
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import CheckpointError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_NORMS = ("input_layernorm", "attn_sub_norm", "post_attention_layernorm", "ffn_sub_norm")


@dataclass
class TernaryWeight:
    """A BitLinear weight: W = values * beta, values in {-1, 0, +1}."""

    values: torch.Tensor  # (out, in) int8
    beta: float  # per-tensor scale, "multiply" semantics (FORMATS.md A.4)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.values.to(dtype) * self.beta


Weights = dict  # name -> torch.Tensor | TernaryWeight


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qs, kvs = config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (v, h), "norm": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (v, h)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm"] = (h,)
        shapes[p + "post_attention_layernorm"] = (h,)
        if config.sub_norms:
            shapes[p + "attn_sub_norm"] = (qs,)
            shapes[p + "ffn_sub_norm"] = (f,)
        shapes[p + "q_proj"] = (qs, h)
        shapes[p + "k_proj"] = (kvs, h)
        shapes[p + "v_proj"] = (kvs, h)
        shapes[p + "o_proj"] = (h, qs)
        shapes[p + "gate_proj"] = (f, h)
        shapes[p + "up_proj"] = (f, h)
        shapes[p + "down_proj"] = (h, f)
    return shapes


def check_weights(config: ModelConfig, weights: Weights, source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing tensor or wrong shape."""
    for name, shape in expected_shapes(config).items():
        if name not in weights:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {list(shape)})")
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {list(got)}, expected {list(shape)} from the config"
            )
        is_ternary = name.rsplit(".", 1)[-1] in PROJECTIONS
        if is_ternary != isinstance(weights[name], TernaryWeight):
            kind = "a ternary projection" if is_ternary else "a float tensor"
            raise CheckpointError(f"{source}: tensor {name!r} should be {kind}")
