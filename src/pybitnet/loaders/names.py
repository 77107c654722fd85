"""One name table: Hugging Face and GGUF tensor names <-> internal names (docs/formats.md).

Layering: below the loaders that read and write the formats; imports nothing of the engine but its errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import CheckpointError

# internal per-layer suffix -> (HF suffix, GGUF suffix)
LAYER_NAMES = {
    "input_layernorm": ("input_layernorm.weight", "attn_norm.weight"),
    "post_attention_layernorm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "attn_sub_norm": ("self_attn.attn_sub_norm.weight", "attn_sub_norm.weight"),
    "ffn_sub_norm": ("mlp.ffn_sub_norm.weight", "ffn_sub_norm.weight"),
    "q_proj": ("self_attn.q_proj.weight", "attn_q.weight"),
    "k_proj": ("self_attn.k_proj.weight", "attn_k.weight"),
    "v_proj": ("self_attn.v_proj.weight", "attn_v.weight"),
    "o_proj": ("self_attn.o_proj.weight", "attn_output.weight"),
    "gate_proj": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "up_proj": ("mlp.up_proj.weight", "ffn_up.weight"),
    "down_proj": ("mlp.down_proj.weight", "ffn_down.weight"),
}
# 1bitLLM (BitnetForCausalLM) spells the two sub-norms differently.
HF_ALIASES = {
    "self_attn.inner_attn_ln.weight": "self_attn.attn_sub_norm.weight",
    "mlp.ffn_layernorm.weight": "mlp.ffn_sub_norm.weight",
}
GLOBAL_NAMES = {
    "embed_tokens": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_INTERNAL_LAYER = re.compile(r"^layers\.(\d+)\.")
_HF_TO_INTERNAL = {hf: internal for internal, (hf, _) in LAYER_NAMES.items()}
_GGUF_TO_INTERNAL = {gg: internal for internal, (_, gg) in LAYER_NAMES.items()}


def hf_to_internal(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.q_proj`; None for names we do not use."""
    for internal, (hf, _) in GLOBAL_NAMES.items():
        if name == hf:
            return internal
    m = _HF_LAYER.match(name)
    if m:
        suffix = HF_ALIASES.get(m.group(2), m.group(2))
        if suffix in _HF_TO_INTERNAL:
            return f"layers.{m.group(1)}.{_HF_TO_INTERNAL[suffix]}"
    return None


def internal_to_hf(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name][0]
    _, idx, suffix = name.split(".", 2)
    return f"model.layers.{idx}.{LAYER_NAMES[suffix][0]}"


def gguf_to_internal(name: str) -> str | None:
    for internal, (_, gg) in GLOBAL_NAMES.items():
        if name == gg:
            return internal
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _GGUF_TO_INTERNAL:
        return f"layers.{m.group(1)}.{_GGUF_TO_INTERNAL[m.group(2)]}"
    return None


def internal_to_gguf(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name][1]
    _, idx, suffix = name.split(".", 2)
    return f"blk.{idx}.{LAYER_NAMES[suffix][1]}"


def check_layer_count(num_layers: int, internal_names: Iterable[str], what: str,
                      error: type[CheckpointError] = CheckpointError) -> None:
    """CheckpointError unless the tensors hold exactly layers 0..num_layers-1. Runs before anything is
    sized by num_layers, so a corrupt count of 10**7 costs one pass over the names. `what` names the
    count's origin ("config.json: num_hidden_layers")."""
    present = {int(m.group(1)) for m in map(_INTERNAL_LAYER.match, internal_names) if m}
    if num_layers == len(present) and (not present or max(present) == num_layers - 1):
        return
    first_missing = next(i for i in range(len(present) + 1) if i not in present)
    detail = (f"layer {first_missing} has no tensors" if first_missing < max(present, default=-1)
              else f"the tensors hold {len(present)} layers")
    span = f" (names up to layer {max(present)})" if present else ""
    raise error(f"{what} is {num_layers} but {detail}{span}")
