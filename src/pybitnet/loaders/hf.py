"""Hugging Face checkpoints: config.json + *.safetensors (sharded or not), read memory-mapped.

Reads packed uint8 ternaries with `weight_scale` (docs/formats.md: multiplied for
`autobitlinear`, divided for `bitlinear`) and float master weights (`-bf16` repos, 1bitLLM
`BitnetForCausalLM`), which are ternarized once with absmean. Writes the packed layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..head import head_block_type, quantize_table
from ..quant.ggml_blocks import QuantizedTable
from ..quant.hf_pack import pack_hf, unpack_hf
from ..quant.ternary import absmean_ternarize
from ..weights import TernaryWeight, Weights, check_weights, expected_shapes, is_projection, require_finite
from .names import check_layer_count, hf_to_internal, internal_to_hf

# architectures -> whether they carry the two sub-norms
ARCHITECTURES = {
    "BitNetForCausalLM": True,  # microsoft/bitnet-b1.58-2B-4T (+ -bf16)
    "BitnetForCausalLM": True,  # 1bitLLM reproductions (inner_attn_ln / ffn_layernorm)
    "LlamaForCausalLM": False,  # HF1BitLLM Llama3-8B-1.58, Falcon3-*-1.58bit (bitnet quantization_config)
}
HF_ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "swish": "silu"}
_FLOAT_SAFETENSORS = ("F64", "F32", "F16", "BF16")  # safetensors dtype names a float table may have


def _read_json_file(file: Path, what: str) -> Any:
    """A JSON file's value; CheckpointError naming the file when it is not UTF-8 JSON."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{file}: {what} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON ({err})") from None


def read_config(path: str | Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    raw = _read_json_file(cfg_path, "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: config.json must hold a JSON object, got a {type(raw).__name__}")
    return raw


_MISSING = object()


def _field(raw: dict, key: str, kind: type, source: str, default: Any = _MISSING) -> Any:
    """raw[key] as `kind` (int, float, bool or str); ConfigError naming the key when it is absent or of another
    type. JSON has one number type, so an integral float passes as an int and an int as a float."""
    value = raw.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"{source}: missing key {key!r}")
    if value is None and default is None:
        return None
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool)
        or isinstance(value, float) and value.is_integer(),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"{source}: {key} must be {_KIND_WORDS[kind]}, got {shown}")
    return kind(value)


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _token_ids(raw: dict, key: str, source: str) -> tuple[int, ...]:
    value = raw.get(key)
    values = value if isinstance(value, list) else ([] if value is None else [value])
    return tuple(_field({key: v}, key, int, source) for v in values)


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: architectures must be a list of class names, got {archs!r}")
    arch = next((a for a in archs if isinstance(a, str) and a in ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(f"{source}: unknown architecture {archs or raw.get('model_type')!r}; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    quant = raw.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: quantization_config must be a JSON object, got {quant!r}")
    if arch == "LlamaForCausalLM" and quant.get("quant_method") != "bitnet":
        raise ConfigError(f"{source}: LlamaForCausalLM without a bitnet quantization_config is not a BitNet model")
    if quant.get("use_rms_norm"):
        raise ConfigError(f"{source}: quantization_config.use_rms_norm=true is not supported")
    linear_class = _field(quant, "linear_class", str, f"{source} quantization_config", "bitlinear")
    act = _field(raw, "hidden_act", str, source, "silu")
    if act not in HF_ACTIVATIONS:
        raise ConfigError(f"{source}: unknown activation hidden_act={act!r}; supported: relu2, silu")
    heads = _field(raw, "num_attention_heads", int, source)
    bos = _token_ids(raw, "bos_token_id", source)
    return ModelConfig(
        vocab_size=_field(raw, "vocab_size", int, source),
        hidden_size=_field(raw, "hidden_size", int, source),
        intermediate_size=_field(raw, "intermediate_size", int, source),
        num_layers=_field(raw, "num_hidden_layers", int, source),
        num_heads=heads,
        num_kv_heads=_field(raw, "num_key_value_heads", int, source, None) or heads,
        head_dim=_field(raw, "head_dim", int, source, None) or 0,
        hidden_act=HF_ACTIVATIONS[act],
        rope_theta=_field(raw, "rope_theta", float, source, 10000.0),
        rms_norm_eps=_field(raw, "rms_norm_eps", float, source, 1e-5),
        max_position_embeddings=_field(raw, "max_position_embeddings", int, source, 2048),
        tie_word_embeddings=_field(raw, "tie_word_embeddings", bool, source, True),
        sub_norms=ARCHITECTURES[arch],
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(raw, "eos_token_id", source),
        architecture=arch,
        extra={"linear_class": linear_class, "quant_method": quant.get("quant_method")},
    )


def _inside(directory: Path, name: Any, source: Path) -> Path:
    """directory / name for a file a checkpoint names; CheckpointError when the name leaves the directory.
    Checked on the name itself, not the resolved path: the hub cache links files to blobs elsewhere."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}: file names must be non-empty strings, got {name!r}")
    normal = os.path.normpath(name)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        raise CheckpointError(f"{source}: names {name!r}, which lies outside the model directory {directory}")
    return directory / normal


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        spec = _read_json_file(index, "the shard index")
        weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' object of tensor -> file")
        files = sorted({_inside(path, f, index) for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: shard {f.name} named in the index is missing")
    return files


def load_hf_weights(path: str | Path, lm_head: str = "exact") -> tuple[ModelConfig, Weights, dict]:
    """Read an HF directory into (config, internal weights, info). With a block `lm_head` mode (head.py) the
    table the head runs over (`lm_head`, tied: `embed_tokens`) comes back in that block type, quantized from
    the file's rows a chunk at a time."""
    path = Path(path)
    raw = read_config(path)
    config = config_from_hf(raw, str(path / "config.json"))
    head_block_type(lm_head, config.hidden_size, label=f"the output table of {path}")  # before reading gigabytes
    inverse_scale = config.extra["linear_class"] != "autobitlinear"
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    tables: dict[str, Path] = {}  # embed_tokens / lm_head -> its shard: read once the tying is known
    files = _shard_files(path)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for hf_name in handle.keys():
                    if hf_name.endswith(".weight_scale"):
                        scales[hf_name[: -len("_scale")]] = handle.get_tensor(hf_name)
                        continue
                    name = hf_to_internal(hf_name)
                    if name in ("embed_tokens", "lm_head"):
                        tables[name] = file
                        origin[name] = hf_name
                    elif name is not None:
                        tensors[name] = handle.get_tensor(hf_name)
                        origin[name] = hf_name
        except SafetensorError as err:
            raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {err}") from None
    # before any per-layer table is built: a corrupt layer count must cost nothing
    check_layer_count(config.num_layers, tensors, f"{path / 'config.json'}: num_hidden_layers")
    if "lm_head" in tables and config.tie_word_embeddings and "tie_word_embeddings" not in raw:
        config = config.replace(tie_word_embeddings=False)
    if config.tie_word_embeddings:
        tables.pop("lm_head", None)  # a tied checkpoint's stray lm_head is never read
    head_name = "embed_tokens" if config.tie_word_embeddings else "lm_head"
    for name, file in tables.items():
        tensors[name] = _read_table(file, origin[name], lm_head if name == head_name else "exact", path)
    shapes = expected_shapes(config.replace(tie_word_embeddings=False))

    weights: Weights = {}
    packed_count = 0
    for name, tensor in tensors.items():
        if not is_projection(name):
            weights[name] = tensor if name in ("embed_tokens", "lm_head") else tensor.float()
            continue
        hf_name = origin[name]
        out_features, in_features = shapes[name]
        if tensor.dtype == torch.uint8:
            expected = (-(-out_features // 4), in_features)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{path}: packed tensor {hf_name!r} has shape {list(tensor.shape)}, "
                                      f"expected {list(expected)} for a ({out_features}, {in_features}) projection")
            if hf_name not in scales:
                raise CheckpointError(f"{path}: missing tensor {hf_name + '_scale'!r} for packed weight {hf_name!r}")
            scale = float(scales[hf_name].float().reshape(-1)[0])
            # a zero or non-finite scale is refused by check_weights below, with the tensor named
            beta = 1.0 / scale if inverse_scale and scale != 0 else scale
            values = unpack_hf(tensor, out_features, hf_name)
            weights[name] = TernaryWeight(values, beta).packed_form()
            packed_count += 1
        elif tensor.dtype.is_floating_point:
            if tuple(tensor.shape) != (out_features, in_features):
                raise CheckpointError(f"{path}: tensor {hf_name!r} has shape {list(tensor.shape)}, "
                                      f"expected {[out_features, in_features]}")
            require_finite(tensor, repr(hf_name), str(path))  # absmean would spread a NaN into every weight
            values, beta = absmean_ternarize(tensor)
            weights[name] = TernaryWeight(values, beta).packed_form()
        else:
            raise CheckpointError(f"{path}: tensor {hf_name!r} has unsupported dtype {tensor.dtype}")
    check_weights(config, weights, source=str(path), stored_name=lambda name: origin.get(name, internal_to_hf(name)))
    embed = weights["embed_tokens"]
    info = {"format": "hf", "packed": packed_count > 0, "files": len(files),
            "embed_dtype": embed.type_name if isinstance(embed, QuantizedTable) else str(embed.dtype).replace("torch.", "")}
    return config, weights, info


def _read_table(file: Path, hf_name: str, lm_head: str, path: Path) -> torch.Tensor | QuantizedTable:
    """An embedding / lm_head tensor as stored, or for a block `lm_head` mode its blocks, quantized from rows
    read a chunk at a time (safetensors slices), so the float table is never held whole."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            stored = handle.get_slice(hf_name)
            shape, dtype = tuple(stored.get_shape()), stored.get_dtype()
            if head_block_type(lm_head) is None or len(shape) != 2 or dtype not in _FLOAT_SAFETENSORS:
                return handle.get_tensor(hf_name)  # check_weights names a wrong shape or dtype
            type_name = head_block_type(lm_head, shape[1], label=f"{hf_name!r} of {file}")
            return quantize_table(lambda start, stop: stored[start:stop], shape, type_name, repr(hf_name), str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {err}") from None


def hf_config_dict(config: ModelConfig, linear_class: str = "autobitlinear", torch_dtype: str = "bfloat16") -> dict:
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": torch_dtype,
        "quantization_config": {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"},
    }


def save_hf(path: str | Path, config: ModelConfig, weights: Weights, *, linear_class: str = "autobitlinear",
            float_dtype: torch.dtype = torch.bfloat16, scale_dtype: torch.dtype = torch.float32,
            max_shard_bytes: int | None = None) -> Path:
    """Write the packed HF layout that transformers' BitNetForCausalLM loads (docs/formats.md).

    Every float tensor (embedding, lm_head, norms) is written in `float_dtype`, the config's
    torch_dtype, as the 2B-4T repo does: transformers keeps an offline autobitlinear checkpoint's
    float weights in their on-disk dtype, so mixing bf16 and fp32 there breaks its forward.
    """
    if config.sub_norms is False:
        raise ConfigError("save_hf writes BitNetForCausalLM, which always has sub-norms")
    if linear_class not in ("autobitlinear", "bitlinear"):
        raise ConfigError(f"linear_class must be 'autobitlinear' or 'bitlinear', got {linear_class!r}")
    check_weights(config, weights, source="save_hf")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name in expected_shapes(config):
        value = weights[name]
        hf_name = internal_to_hf(name)
        if isinstance(value, TernaryWeight):
            tensors[hf_name] = pack_hf(value.values).contiguous()
            scale = value.beta if linear_class == "autobitlinear" else 1.0 / value.beta
            tensors[hf_name + "_scale"] = torch.tensor([scale], dtype=scale_dtype)
        elif isinstance(value, QuantizedTable):  # a GGUF block table: its values
            tensors[hf_name] = value.dequantize(float_dtype)
        else:
            tensors[hf_name] = value.to(float_dtype).contiguous()
    dtype_name = str(float_dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(hf_config_dict(config, linear_class, dtype_name), indent=2))
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards
