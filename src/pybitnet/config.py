"""ModelConfig: the hyper-parameters of one BitNet b1.58 model, built from the checkpoint's own metadata."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError

ACTIVATIONS = ("relu2", "silu")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_act: str = "relu2"  # "relu2" (2B-4T) or "silu" (1bitLLM family)
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    sub_norms: bool = True  # attn_sub_norm / ffn_sub_norm before o_proj / down_proj
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "BitNetForCausalLM"
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"unknown hidden activation {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        # NaN fails every comparison, so these are written as "must hold" rather than "must not"
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a finite number > 0, got {self.rope_theta}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise ConfigError(f"rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def ternary_parameters(self) -> int:
        """Weights held by the seven BitLinear projections of all layers."""
        h, f = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * f
        return self.num_layers * per_layer

    def float_parameters(self) -> int:
        """Embedding (+ untied lm_head) and norm weights."""
        h, f = self.hidden_size, self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        norms = self.num_layers * (2 * h + (self.q_size + f if self.sub_norms else 0)) + h
        return emb + norms


PRESETS: dict[str, ModelConfig] = {
    # microsoft/bitnet-b1.58-2B-4T (docs/formats.md)
    "bitnet-b1.58-2b-4t": ModelConfig(
        vocab_size=128256,
        hidden_size=2560,
        intermediate_size=6912,
        num_layers=30,
        num_heads=20,
        num_kv_heads=5,
        hidden_act="relu2",
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    # A small model with the same structure (GQA 4:1, relu², tied) for tests and examples.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        hidden_act="relu2",
        rope_theta=10000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    # The 2B-4T architecture scaled down to a few million parameters (relu², sub-norms, tied
    # embeddings, GQA 4:1): the shape of the built-in trained model. Widths are multiples of 256
    # so every GGUF ternary type (TQ1_0/TQ2_0 need 256-element rows) can hold it.
    "small": ModelConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=4,
        num_kv_heads=1,
        hidden_act="relu2",
        rope_theta=10000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_ids=(1, 2),
    ),
}


def preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]
