"""The checkpoint-independent weight set that every loader produces and the model consumes.

Names are internal and format-free (`loaders/names.py` maps HF and GGUF names onto them):
    embed_tokens [V, H] float     lm_head [V, H] float (untied only)     norm [H]
        (embed_tokens / lm_head may be a QuantizedTable: GGUF Q8_0 / Q4_0 / Q6_K / Q5_K / Q4_K blocks kept as stored)
    layers.N.input_layernorm [H]  layers.N.attn_sub_norm [Hq*D]  layers.N.post_attention_layernorm [H]
    layers.N.ffn_sub_norm [F]     layers.N.{q,k,v,o,gate,up,down}_proj -> TernaryWeight
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .quant.ggml_blocks import QuantizedTable
from .quant.packed import pack_ternary, release_free_heap, unpack_ternary

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TernaryWeight:
    """A BitLinear weight: W = values * beta, values in {-1, 0, +1}.

    Held either as int8 values (out, in) or packed at 2 bits per weight (quant/packed.py), the form
    the model keeps. Loaders pack each tensor as they decode it (`packed_form`), so the int8 form of
    a whole model never exists; `values` unpacks on demand for writers and tests.
    """

    def __init__(self, values: torch.Tensor | None = None, beta: float = 1.0, *,
                 packed: torch.Tensor | None = None, in_features: int | None = None):
        if (values is None) == (packed is None):
            raise ValueError("TernaryWeight takes either int8 values or packed codes")
        if packed is not None and in_features is None:
            raise ValueError("a packed TernaryWeight needs in_features")
        self._values = values  # (out, in) int8, or None when packed
        self._packed = packed  # (out, ceil(in/256) * 64) uint8, or None
        self._in_features = int(in_features) if packed is not None else int(values.shape[1])
        self.beta = beta  # per-tensor scale, "multiply" semantics (docs/formats.md)

    @property
    def shape(self) -> tuple[int, int]:
        rows = self._packed.shape[0] if self._packed is not None else self._values.shape[0]
        return (int(rows), self._in_features)

    @property
    def device(self) -> torch.device:
        return (self._packed if self._packed is not None else self._values).device

    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    @property
    def values(self) -> torch.Tensor:
        """(out, in) int8 in {-1, 0, 1}; unpacked (a new tensor) when held packed."""
        if self._values is not None:
            return self._values
        return unpack_ternary(self._packed, self._in_features)[:, : self._in_features]

    @property
    def packed(self) -> torch.Tensor:
        """(out, ceil(in/256) * 64) uint8 in the packed layout; packed (a new tensor) when held as int8."""
        return self._packed if self._packed is not None else pack_ternary(self._values)

    def packed_form(self) -> "TernaryWeight":
        """The same weight held packed (self when it already is).

        Loaders call this once per tensor as they decode it; the decode's int8 temporaries are then
        handed back to the OS (release_free_heap), or the heap would keep them, fragmented between
        the packed tensors that stay, and a load would peak at about the int8 size of the model."""
        if self.is_packed:
            return self
        packed = TernaryWeight(packed=self.packed, in_features=self._in_features, beta=self.beta)
        if self._values.device.type == "cpu":
            release_free_heap()
        return packed

    def with_beta(self, beta: float) -> "TernaryWeight":
        if self.is_packed:
            return TernaryWeight(packed=self._packed, in_features=self._in_features, beta=beta)
        return TernaryWeight(self._values, beta)

    def to(self, device: torch.device | str) -> "TernaryWeight":
        """On `device`, in the form BitLinear keeps there (packed on CPU, int8 elsewhere)."""
        device = torch.device(device)
        if device.type == "cpu":
            weight = self.packed_form()
            return TernaryWeight(packed=weight._packed.to(device), in_features=self._in_features, beta=float(self.beta))
        return TernaryWeight(self.values.to(device=device, dtype=torch.int8), float(self.beta))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.values.to(dtype) * self.beta

    def __repr__(self) -> str:
        form = "packed" if self.is_packed else "int8"
        return f"TernaryWeight(shape={list(self.shape)}, beta={self.beta}, {form})"


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


def is_projection(name: str) -> bool:
    """Whether an internal weight name (`layers.3.q_proj`) is one of the seven ternary projections."""
    return name.rsplit(".", 1)[-1] in PROJECTIONS


def require_finite(tensor: torch.Tensor, label: str, source: str = "checkpoint") -> None:
    """CheckpointError naming `label` when the float tensor holds inf or NaN."""
    if tensor.numel() == 0:
        return
    # min and max propagate NaN and show ±inf; one pass, no temporaries (isfinite is ~30x slower on bf16)
    low, high = torch.aminmax(tensor)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise CheckpointError(f"{source}: tensor {label} holds non-finite values (inf or NaN)")


def check_weights(config: ModelConfig, weights: Weights, source: str = "checkpoint",
                  stored_name: Callable[[str], str] | None = None) -> None:
    """Raise CheckpointError naming the first missing tensor, wrong shape, non-finite float tensor, or
    projection scale that is not a finite number > 0 (float32 rounding would otherwise turn those into
    finite, wrong logits). `stored_name` maps internal names to the file's own, for the messages."""
    for name, shape in expected_shapes(config).items():
        label = repr(name) if stored_name is None else f"{stored_name(name)!r} ({name})"
        if name not in weights:
            raise CheckpointError(f"{source}: missing tensor {label} (expected shape {list(shape)})")
        weight = weights[name]
        got = tuple(weight.shape)
        if got != shape:
            raise CheckpointError(
                f"{source}: tensor {label} has shape {list(got)}, expected {list(shape)} from the config"
            )
        is_ternary = is_projection(name)
        if is_ternary != isinstance(weight, TernaryWeight):
            kind = "a ternary projection" if is_ternary else "a float tensor"
            raise CheckpointError(f"{source}: tensor {label} should be {kind}")
        if is_ternary:
            beta = float(weight.beta)
            if not (math.isfinite(beta) and beta > 0):
                raise CheckpointError(f"{source}: tensor {label} has scale {beta}; a scale must be a finite number > 0")
        elif isinstance(weight, QuantizedTable):
            if not weight.scales_finite:
                require_finite(weight.scales(), label, source)  # finite scales: finite values
                weight.scales_finite = True
        else:
            require_finite(weight, label, source)
