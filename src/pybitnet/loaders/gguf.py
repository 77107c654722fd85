"""BitNet GGUF models: (ModelConfig, Weights) from a file's own metadata, and the matching writer.

Architectures (docs/formats.md):
    bitnet-b1.58, bitnet-25   bitnet.cpp (official 2B-4T files): relu², sub-norms, I2_S projections
    bitnet                    llama.cpp (1bitLLM lineage): SiLU unless `bitnet.hidden_activation` is
                              "relu2"; TQ1_0 / TQ2_0 / F16 / F32 projections
Ternary projections decode tensor by tensor straight to int8 values + beta; the mapped file's pages
are released after each tensor, so loading holds the decoded model and little else. token_embd and
output in Q8_0, Q4_0, Q6_K, Q5_K or Q4_K stay as stored (quant/ggml_blocks.QuantizedTable); other block
types are dequantized to float32, with one line on stderr saying so.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Callable, Mapping

import gguf
import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ConfigError, GGUFError
from ..head import head_block_type, quantize_table
from ..quant.ggml_blocks import KEPT_TYPES, QuantizedTable, quantize_rows, row_bytes
from ..quant.i2s import decode_i2s, encode_i2s
from ..quant.tq import TQ1_0_BLOCK_BYTES, TQ2_0_BLOCK_BYTES, decode_tq1_0, decode_tq2_0, encode_tq1_0, encode_tq2_0
from ..weights import TernaryWeight, Weights, check_weights, expected_shapes, is_projection
from .gguf_file import (
    I2_S_TYPE_ID,
    TYPE_BY_NAME,
    GGUFReader,
    GGUFValue,
    TensorInfo,
    TensorSpec,
    ValueType,
    read_gguf_metadata,
    write_gguf_file,
)
from .names import check_layer_count, gguf_to_internal, internal_to_gguf

__all__ = ["load_gguf_weights", "write_gguf", "read_gguf_metadata", "config_from_gguf", "QTYPES"]

RELU2_ARCHS = ("bitnet-b1.58", "bitnet-25")  # bitnet.cpp's graph hard-wires relu² for these names
ARCHS = ("bitnet",) + RELU2_ARCHS
_INT_TYPES = {ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32,
              ValueType.INT32, ValueType.UINT64, ValueType.INT64}
_FLOAT_TYPES = {ValueType.FLOAT32, ValueType.FLOAT64}
_DENSE_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "F64": torch.float64, "BF16": torch.bfloat16}
_TABLE_CHUNK_BYTES = 16 << 20  # a table is copied out of the mapping this much at a time


# ------------------------------------------------------------------------------------------------
# metadata -> config


class _Meta:
    """Typed access to metadata; every error names the key and what was found."""

    def __init__(self, fields: Mapping[str, GGUFValue], path: str) -> None:
        self.fields, self.path = fields, path

    def _scalar(self, key: str, field: GGUFValue) -> Any:
        if field.type == ValueType.ARRAY:  # llama.cpp allows per-layer arrays; we need them uniform
            values = field.value
            if not values or any(v != values[0] for v in values) or field.elem_type not in _INT_TYPES:
                raise GGUFError(f"{self.path}: metadata {key!r} is a non-uniform or non-integer array")
            return values[0]
        return field.value

    def int(self, key: str, default: int | None = None) -> int:
        if key not in self.fields:
            if default is None:
                raise GGUFError(f"{self.path}: missing metadata key {key!r}")
            return default
        field = self.fields[key]
        value = self._scalar(key, field)
        if field.type not in _INT_TYPES and field.elem_type not in _INT_TYPES:
            raise GGUFError(f"{self.path}: metadata {key!r} should be an integer, got {field.type.name} {value!r}")
        return int(value)

    def float(self, key: str, default: float) -> float:
        if key not in self.fields:
            return default
        field = self.fields[key]
        if field.type not in _FLOAT_TYPES | _INT_TYPES:
            raise GGUFError(f"{self.path}: metadata {key!r} should be a number, got {field.type.name} {field.value!r}")
        if field.type == ValueType.FLOAT32:
            # the shortest decimal that rounds to this f32 is what the writer started from (1e-05, not 9.99e-06)
            return float(str(np.float32(field.value)))
        return float(field.value)

    def str(self, key: str, default: str | None = None) -> str | None:
        if key not in self.fields:
            return default
        field = self.fields[key]
        if field.type != ValueType.STRING:
            raise GGUFError(f"{self.path}: metadata {key!r} should be a string, got {field.type.name} {field.value!r}")
        return field.value


def _activation(arch: str, meta: _Meta) -> str:
    if arch in RELU2_ARCHS:
        return "relu2"
    act = meta.str(f"{arch}.hidden_activation", "silu")  # llama.cpp's default for `bitnet` is SiLU
    if act not in ("relu2", "silu"):
        raise GGUFError(f"{meta.path}: unsupported {arch}.hidden_activation {act!r} (supported: relu2, silu)")
    return act


def config_from_gguf(fields: Mapping[str, GGUFValue], tensors: Mapping[str, TensorInfo], path: str = "<gguf>") -> ModelConfig:
    """A ModelConfig from the metadata (and which tensors exist: tied lm_head, sub-norms)."""
    meta = _Meta(fields, path)
    arch = meta.str("general.architecture")
    if arch is None:
        raise GGUFError(f"{path}: missing metadata key 'general.architecture'")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHS)})")
    hidden = meta.int(f"{arch}.embedding_length")
    heads = meta.int(f"{arch}.attention.head_count")
    # 0 lets ModelConfig derive hidden / heads, and name the problem when it does not divide
    head_dim = meta.int(f"{arch}.attention.key_length", 0)
    scaling = meta.str(f"{arch}.rope.scaling.type", "none")
    factor = meta.float(f"{arch}.rope.scaling.factor", 1.0)
    if scaling not in ("none", "linear") or factor not in (0.0, 1.0):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} x{factor} is not supported")
    embd = tensors.get("token_embd.weight")
    vocab_default = embd.ne[1] if embd is not None and len(embd.ne) == 2 else None
    eos = [meta.int(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in fields]
    bos = meta.int("tokenizer.ggml.bos_token_id") if "tokenizer.ggml.bos_token_id" in fields else None
    try:
        config = ModelConfig(
            vocab_size=meta.int(f"{arch}.vocab_size", vocab_default),
            hidden_size=hidden,
            intermediate_size=meta.int(f"{arch}.feed_forward_length"),
            num_layers=meta.int(f"{arch}.block_count"),
            num_heads=heads,
            num_kv_heads=meta.int(f"{arch}.attention.head_count_kv", heads),
            hidden_act=_activation(arch, meta),
            head_dim=head_dim,
            rope_theta=meta.float(f"{arch}.rope.freq_base", 10000.0),
            rms_norm_eps=meta.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            max_position_embeddings=meta.int(f"{arch}.context_length", 4096),
            tie_word_embeddings="output.weight" not in tensors,
            sub_norms="blk.0.attn_sub_norm.weight" in tensors,
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            architecture="BitNetForCausalLM",
            extra={"gguf_architecture": arch, "gguf_name": meta.str("general.name", "")},
        )
    except ConfigError as err:  # a corrupt file is a checkpoint problem: keep the loader's one error type
        raise GGUFError(f"{path}: metadata describes an invalid model: {err}") from None
    rotary = meta.int(f"{arch}.rope.dimension_count", config.head_dim)
    if rotary != config.head_dim:
        raise GGUFError(f"{path}: {arch}.rope.dimension_count {rotary} != head dim {config.head_dim} "
                        "(partial RoPE is not supported)")
    return config


# ------------------------------------------------------------------------------------------------
# tensors -> weights

_TERNARY_DECODERS: dict[str, Callable[[np.ndarray, tuple[int, int], str], TernaryWeight]] = {
    "I2_S": decode_i2s,
    "TQ1_0": decode_tq1_0,
    "TQ2_0": decode_tq2_0,
}


def _dense(reader: GGUFReader, info: TensorInfo) -> torch.Tensor:
    """A float tensor as stored: F16 -> float16, BF16 -> bfloat16, F32; other ggml types dequantized to float32."""
    raw = reader.tensor_bytes(info)
    kind = info.type.name
    if kind in _DENSE_DTYPES:
        return torch.from_numpy(raw.view(_DENSE_DTYPES[kind]).reshape(info.shape).copy())
    if kind == "BF16":
        return torch.from_numpy(raw.view(np.int16).reshape(info.shape).copy()).view(torch.bfloat16)
    if info.type.id == I2_S_TYPE_ID:
        raise GGUFError(f"{reader.path}: tensor {info.name!r} is I2_S, which only ternary projections may use")
    try:
        qtype = gguf.GGMLQuantizationType(info.type.id)
        rows = raw.reshape(-1, raw.size // (info.n_elements // info.ne[0]))  # (rows, bytes per row)
        values = gguf.quants.dequantize(rows, qtype)  # (rows, ne0) float32
    except (NotImplementedError, ValueError) as err:
        raise GGUFError(f"{reader.path}: tensor {info.name!r} has ggml type {kind}, which cannot be dequantized: {err}") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(info.shape))


def _table(reader: GGUFReader, info: TensorInfo, shape: tuple[int, ...], lm_head: str = "exact") -> torch.Tensor | QuantizedTable:
    """token_embd / output: the KEPT_TYPES (Q8_0, Q4_0, Q6_K, Q5_K, Q4_K) as stored, left in the file's
    mapping; 16-bit and float32 as stored (copied); other block types dequantized to float32 with one line
    on stderr.

    For the table the head runs over, a block lm_head mode (head.py) quantizes a float table to its type as
    the rows are read; a table stored in another block type is refused (it would be rounded twice)."""
    kind = info.type.name
    floats = kind in _DENSE_DTYPES or kind == "BF16"
    block_type = head_block_type(lm_head, shape[1], None if floats else kind, f"{info.name} of {reader.path}")
    if block_type is not None and floats:
        return quantize_table(lambda start, stop: _float_rows(reader, info, shape, start, stop), shape, block_type,
                              repr(info.name), reader.path)
    if kind in KEPT_TYPES:
        return QuantizedTable(_mapped_rows(reader, info, shape[0], row_bytes(kind, shape[1])), kind, shape[1])
    if floats:  # as stored, copied out in pieces: a whole copy beside the mapping's pages would be the table twice
        return _table_bytes(reader, info, shape[0]).view(_TORCH_DTYPES[kind]).reshape(shape)
    print(f"pybitnet: {reader.path}: {info.name} is {kind}, loaded dequantized to float32 "
          f"({4 * info.n_elements / 2**20:,.1f} MiB; kept as stored: {', '.join(KEPT_TYPES)})", file=sys.stderr)
    return _dense(reader, info).reshape(shape)


def _mapped_rows(reader: GGUFReader, info: TensorInfo, rows: int, per_row: int) -> torch.Tensor:
    """A block table as a read-only (rows, bytes per row) uint8 view of the file's mapping, not a copy: the
    process holds only the pages it reads (an embedding's looked-up rows; all of a head's), as clean file
    pages that other processes mapping the file share. The view keeps the mapping alive after the reader
    closes. Nothing writes to a table; writers replace files by rename, so a mapped file is never
    rewritten under a running model."""
    blocks = reader.tensor_bytes(info).reshape(rows, per_row)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note that the array is not writable
        return torch.from_numpy(blocks)


def _table_bytes(reader: GGUFReader, info: TensorInfo, rows: int) -> torch.Tensor:
    """A table's bytes as (rows, bytes per row) uint8, copied out of the mapping _TABLE_CHUNK_BYTES at a time,
    each piece's pages released after it."""
    per_row = info.nbytes // rows
    stored = reader.tensor_bytes(info).reshape(rows, per_row)
    data = torch.empty(rows, per_row, dtype=torch.uint8)
    target = data.numpy()
    step = max(1, _TABLE_CHUNK_BYTES // per_row)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        target[start:stop] = stored[start:stop]
        _release_rows(reader, info, per_row, start, stop)
    return data


def _release_rows(reader: GGUFReader, info: TensorInfo, per_row: int, start: int, stop: int) -> None:
    """Drop the mapping's pages of a table's rows [start, stop) from the resident set."""
    reader.release(dataclasses.replace(info, data_offset=info.data_offset + start * per_row, nbytes=(stop - start) * per_row))


def _float_rows(reader: GGUFReader, info: TensorInfo, shape: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a float table as float32, copied out of the mapping, whose pages are then released."""
    per_row = info.nbytes // shape[0]
    raw = reader.tensor_bytes(info)[start * per_row : stop * per_row]
    rows = torch.from_numpy(raw.copy()).view(_TORCH_DTYPES[info.type.name]).reshape(stop - start, shape[1]).float()
    _release_rows(reader, info, per_row, start, stop)
    return rows


def _ternary_from_float(weight: torch.Tensor, name: str, path: str) -> TernaryWeight:
    """A float projection that holds T * beta (llama.cpp's F16/F32 conversions) -> TernaryWeight.

    beta = max|W| (as bitnet.cpp's quantizer takes it); every entry must be 0 or ±beta exactly.
    """
    magnitude = weight.abs()
    beta = float(magnitude.max()) if weight.numel() else 0.0
    if not np.isfinite(beta):
        raise GGUFError(f"{path}: projection {name!r} holds non-finite values")
    if beta > 0 and not bool(((magnitude == 0) | (magnitude == beta)).all()):
        raise GGUFError(f"{path}: float projection {name!r} is not ternary * scale (values other than 0 and ±{beta})")
    values = torch.sign(weight).to(torch.int8)  # (out, in)
    return TernaryWeight(values=values, beta=beta).packed_form()


_TQ_BLOCK_BYTES = {"TQ1_0": TQ1_0_BLOCK_BYTES, "TQ2_0": TQ2_0_BLOCK_BYTES}


def _check_block_scales(reader: GGUFReader, info: TensorInfo, block_bytes: int) -> None:
    """Refuse negative block scales: llama.cpp's quantizer writes d = max|x| >= 0, so a negative d is a
    corrupt file, not a sign flip to honour (d = 0 marks an all-zero block and is fine)."""
    data = reader.tensor_bytes(info)
    if data.size % block_bytes:
        return  # the decoder names the size mismatch
    scales = data.reshape(-1, block_bytes)[:, -2:].copy().view("<f2").reshape(-1)  # (nblk,) fp16 d, last in block
    negative = scales < 0
    if negative.any():
        block = int(np.argmax(negative))
        raise GGUFError(f"{reader.path}: projection {info.name!r} has a negative scale {float(scales[block])} "
                        f"in block {block}")


def _projection(reader: GGUFReader, info: TensorInfo, shape: tuple[int, int]) -> TernaryWeight:
    kind = info.type.name
    if kind in _TQ_BLOCK_BYTES:
        _check_block_scales(reader, info, _TQ_BLOCK_BYTES[kind])
    if kind in _TERNARY_DECODERS:
        weight = _TERNARY_DECODERS[kind](reader.tensor_bytes(info), shape, info.name)
    elif kind in ("F32", "F16", "BF16", "F64"):
        weight = _ternary_from_float(_dense(reader, info).view(shape), info.name, reader.path)
    else:
        raise GGUFError(f"{reader.path}: projection {info.name!r} has ggml type {kind}; "
                        "supported for ternary weights: I2_S, TQ1_0, TQ2_0, F16, BF16, F32")
    scale_name = info.name.removesuffix(".weight") + ".scale"
    if scale_name in reader.tensors:  # old llama.cpp conversions: output *= scale, so fold it into beta
        scale_info = reader.tensors[scale_name]
        if scale_info.n_elements != 1 or scale_info.type.name not in _DENSE_DTYPES:
            raise GGUFError(f"{reader.path}: scale tensor {scale_name!r} must be one F32/F16 value, "
                            f"got {scale_info.type.name} ne={list(scale_info.ne)}")
        scale = float(_dense(reader, scale_info).reshape(-1)[0])
        if not np.isfinite(scale):
            raise GGUFError(f"{reader.path}: scale tensor {scale_name!r} holds {scale}")
        weight = weight.with_beta(weight.beta * scale)
    return weight


def _shape_of(info: TensorInfo) -> tuple[int, ...]:
    shape = info.shape
    while len(shape) > 1 and shape[0] == 1:  # ne [2560, 1] is the same vector as ne [2560]
        shape = shape[1:]
    return shape


def load_gguf_weights(path: str | os.PathLike, lm_head: str = "exact") -> tuple[ModelConfig, Weights]:
    """(config, weights) of a BitNet GGUF file, config from its metadata only (docs/formats.md).
    With a block `lm_head` mode (head.py) the table the head runs over (`output`, else `token_embd`) is
    returned in that block type, quantized from the file's float rows a chunk at a time."""
    path = str(path)
    reader = GGUFReader(path)
    try:
        config = config_from_gguf(reader.fields, reader.tensors, path)
        # before any per-layer table is built: a corrupt block_count of 2**40 must cost nothing
        check_layer_count(config.num_layers, filter(None, map(gguf_to_internal, reader.tensors)),
                          f"{path}: metadata {config.extra['gguf_architecture']}.block_count", GGUFError)
        weights: Weights = {}
        for name, shape in expected_shapes(config).items():
            gguf_name = internal_to_gguf(name)
            info = reader.tensors.get(gguf_name)
            if info is None:
                raise GGUFError(f"{path}: missing tensor {gguf_name!r} (expected shape {list(shape)} from the metadata)")
            if _shape_of(info) != shape:
                raise GGUFError(f"{path}: tensor {gguf_name!r} has shape {list(info.shape)} (ne {list(info.ne)}), "
                                f"expected {list(shape)} from the metadata")
            if is_projection(name):
                weights[name] = _projection(reader, info, shape)
            elif name in ("embed_tokens", "lm_head"):
                head = name == ("embed_tokens" if config.tie_word_embeddings else "lm_head")
                # kept in its stored 16-bit or block type, or quantized for a block lm_head mode
                weights[name] = _table(reader, info, shape, lm_head if head else "exact")
            else:
                weights[name] = _dense(reader, info).reshape(shape).float()
            reader.release(info)
        check_weights(config, weights, source=path, stored_name=internal_to_gguf)
        for name in ("embed_tokens", "lm_head"):  # the check read every block's scales: a mapped table's pages
            if isinstance(weights.get(name), QuantizedTable):  # come back as its rows are read
                reader.release(reader.tensors[internal_to_gguf(name)])
    finally:
        reader.close()
    return config, weights


# ------------------------------------------------------------------------------------------------
# writer

# qtype -> (ggml type name of the projections, encoder, general.file_type)
QTYPES: dict[str, tuple[str, Callable[[torch.Tensor, float], np.ndarray], int]] = {
    "i2_s": ("I2_S", encode_i2s, 40),  # 40: bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S
    "tq1_0": ("TQ1_0", encode_tq1_0, int(gguf.LlamaFileType.MOSTLY_TQ1_0)),
    "tq2_0": ("TQ2_0", encode_tq2_0, int(gguf.LlamaFileType.MOSTLY_TQ2_0)),
    "f16": ("F16", lambda values, beta: (values.to(torch.float16) * torch.tensor(beta, dtype=torch.float16)).numpy(),
            int(gguf.LlamaFileType.MOSTLY_F16)),
}
# embedding / output types: float types as (ggml name, torch dtype); block types (ggml name, None)
EMBED_TYPES = {"f16": ("F16", torch.float16), "bf16": ("BF16", torch.bfloat16), "f32": ("F32", torch.float32),
               "q8_0": ("Q8_0", None), "q6_k": ("Q6_K", None), "q4_k": ("Q4_K", None), "q5_k": ("Q5_K", None),
               "q4_0": ("Q4_0", None)}
# tokenizer keys whose GGUF type llama.cpp checks; python values are stored with these types
_TOKENIZER_TYPES = {
    "tokenizer.ggml.token_type": (ValueType.ARRAY, ValueType.INT32),
    "tokenizer.ggml.scores": (ValueType.ARRAY, ValueType.FLOAT32),
    "tokenizer.ggml.tokens": (ValueType.ARRAY, ValueType.STRING),
    "tokenizer.ggml.merges": (ValueType.ARRAY, ValueType.STRING),
}


def _architecture(config: ModelConfig, qtype: str) -> str:
    # bitnet.cpp reads I2_S; its `bitnet-b1.58` graph is relu², its `bitnet` graph SiLU.
    if qtype == "i2_s":
        return "bitnet-b1.58" if config.hidden_act == "relu2" else "bitnet"
    return "bitnet"  # mainline llama.cpp, with bitnet.hidden_activation for relu²


def _metadata(config: ModelConfig, arch: str, file_type: int, tokenizer_metadata: Mapping[str, Any] | None,
              name: str) -> dict[str, Any]:
    f32 = lambda x: GGUFValue(ValueType.FLOAT32, float(x))  # noqa: E731
    fields: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": name,
        "general.file_type": file_type,
        "general.quantization_version": 2,
        f"{arch}.vocab_size": config.vocab_size,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.block_count": config.num_layers,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.rope.dimension_count": config.head_dim,
        f"{arch}.attention.head_count": config.num_heads,
        f"{arch}.attention.head_count_kv": config.num_kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": f32(config.rms_norm_eps),
        f"{arch}.rope.freq_base": f32(config.rope_theta),
    }
    if config.head_dim * config.num_heads != config.hidden_size:
        fields[f"{arch}.attention.key_length"] = config.head_dim
        fields[f"{arch}.attention.value_length"] = config.head_dim
    if arch == "bitnet" and config.hidden_act == "relu2":
        fields["bitnet.hidden_activation"] = "relu2"
    tokenizer = dict(tokenizer_metadata or {})
    if not tokenizer:
        tokenizer["tokenizer.ggml.model"] = "no_vocab"  # llama.cpp refuses a file without this key
    for key, value in tokenizer.items():
        if not key.startswith("tokenizer."):
            raise GGUFError(f"tokenizer metadata key {key!r} does not start with 'tokenizer.'")
        if key in _TOKENIZER_TYPES and not isinstance(value, GGUFValue):
            value = GGUFValue(*_TOKENIZER_TYPES[key][:1], list(value), _TOKENIZER_TYPES[key][1])
        fields[key] = value
    ids = {"tokenizer.ggml.bos_token_id": config.bos_token_id,
           "tokenizer.ggml.eos_token_id": config.eos_token_ids[0] if config.eos_token_ids else None,
           "tokenizer.ggml.eot_token_id": config.eos_token_ids[1] if len(config.eos_token_ids) > 1 else None}
    for key, token_id in ids.items():
        if token_id is not None and key not in fields:
            fields[key] = GGUFValue(ValueType.UINT32, int(token_id))
    return fields


def _dense_spec(gguf_name: str, tensor: torch.Tensor | QuantizedTable, type_name: str, dtype: torch.dtype) -> TensorSpec:
    def produce() -> np.ndarray:
        # a block table's float32 values are made when its turn comes, and dropped after
        source = tensor.dequantize() if isinstance(tensor, QuantizedTable) else tensor
        stored = source.detach().to("cpu", dtype)
        if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(source).all()):
            raise GGUFError(f"tensor {gguf_name!r} overflows {type_name}; choose a wider embedding type")
        if dtype == torch.bfloat16:
            stored = stored.view(torch.int16)
        return stored.contiguous().numpy()

    return TensorSpec(gguf_name, tuple(tensor.shape), TYPE_BY_NAME[type_name], produce)


def _table_spec(gguf_name: str, table: torch.Tensor | QuantizedTable, type_name: str) -> TensorSpec:
    """An embedding / output table in a block type: its blocks as they are when it already has that
    type, else quantized with ggml's reference rounding (quant/ggml_blocks.py)."""
    rows, cols = table.shape
    try:
        nbytes = row_bytes(type_name, cols)
    except ValueError:
        raise GGUFError(f"{type_name.lower()}: tensor {gguf_name!r} has rows of {cols} elements, not a multiple of "
                        f"{TYPE_BY_NAME[type_name].block_size}; choose another embedding type") from None

    def produce() -> np.ndarray:
        if isinstance(table, QuantizedTable) and table.type_name == type_name:
            return table.data.detach().cpu().numpy()
        source = table.dequantize() if isinstance(table, QuantizedTable) else table
        data = quantize_rows(source, type_name)
        if data.shape != (rows, nbytes):
            raise GGUFError(f"tensor {gguf_name!r}: quantized to {data.shape}, expected {(rows, nbytes)}")
        return data

    return TensorSpec(gguf_name, (rows, cols), TYPE_BY_NAME[type_name], produce)


def _ternary_spec(gguf_name: str, weight: TernaryWeight, qtype: str) -> TensorSpec:
    type_name, encode, _ = QTYPES[qtype]
    out_features, in_features = weight.shape
    if type_name.startswith("TQ") and in_features % 256:
        raise GGUFError(f"{qtype}: tensor {gguf_name!r} has rows of {in_features} elements, "
                        "not a multiple of 256 (TQ types need 256-element blocks)")
    if type_name == "I2_S" and (out_features * in_features) % 128:
        raise GGUFError(f"i2_s: tensor {gguf_name!r} of shape {list(weight.shape)} is not a multiple of 128 elements")
    return TensorSpec(gguf_name, (out_features, in_features), TYPE_BY_NAME[type_name],
                      lambda: encode(weight.values.detach().cpu(), float(weight.beta)))


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    weights: Weights,
    qtype: str = "i2_s",
    tokenizer_metadata: Mapping[str, Any] | None = None,
    *,
    embed_type: str = "f16",
    name: str | None = None,
) -> None:
    """Write a BitNet model as GGUF; projections as `qtype` (i2_s | tq2_0 | tq1_0 | f16).

    i2_s writes bitnet.cpp's layout and arch (`bitnet-b1.58` for relu²); the others write
    mainline llama.cpp's `bitnet` arch with `bitnet.hidden_activation = "relu2"` for relu² models.
    Norms are F32; the embedding (and an untied `output`) is `embed_type` (f16 | bf16 | f32 | q8_0 | q6_k | q5_k | q4_k | q4_0;
    a table already in the block type is written as it is, else quantized as llama.cpp does).
    Without tokenizer metadata the file says `tokenizer.ggml.model = "no_vocab"`.
    """
    if qtype not in QTYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}; choose one of: {', '.join(QTYPES)}")
    if embed_type not in EMBED_TYPES:
        raise ConfigError(f"unknown embedding type {embed_type!r}; choose one of: {', '.join(EMBED_TYPES)}")
    check_weights(config, weights, source="write_gguf")
    arch = _architecture(config, qtype)
    embed_name, embed_dtype = EMBED_TYPES[embed_type]
    specs: list[TensorSpec] = []
    for internal in expected_shapes(config):
        gguf_name = internal_to_gguf(internal)
        value = weights[internal]
        if isinstance(value, TernaryWeight):
            specs.append(_ternary_spec(gguf_name, value, qtype))
        elif internal in ("embed_tokens", "lm_head") and embed_dtype is None:
            specs.append(_table_spec(gguf_name, value, embed_name))
        elif internal in ("embed_tokens", "lm_head"):
            specs.append(_dense_spec(gguf_name, value, embed_name, embed_dtype))
        else:
            specs.append(_dense_spec(gguf_name, value, "F32", torch.float32))
    fields = _metadata(config, arch, QTYPES[qtype][2], tokenizer_metadata,
                       name or config.extra.get("gguf_name") or "pybitnet")
    write_gguf_file(path, fields, specs)
