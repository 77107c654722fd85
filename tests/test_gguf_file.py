"""The GGUF container and the BitNet GGUF loader on small files: round trips, cross-checks with
gguf-py, the architecture/activation rules, and every kind of bad input named in the error."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pybitnet import synthetic
from pybitnet.config import ModelConfig
from pybitnet.errors import CheckpointError, ConfigError, GGUFError
from pybitnet.loaders.gguf import load_gguf_weights, read_gguf_metadata, write_gguf
from pybitnet.quant.ggml_blocks import QuantizedTable
from pybitnet.loaders.gguf_file import (
    TYPE_BY_NAME,
    GGUFReader,
    GGUFValue,
    TensorSpec,
    ValueType,
    write_gguf_file,
)
from pybitnet.weights import TernaryWeight

# ------------------------------------------------------------------------------------------ helpers
# (also imported by the other test_gguf_* files)


def micro_config(**changes) -> ModelConfig:
    """The smallest BitNet shape every GGUF type can hold in I2_S (n % 128 == 0)."""
    base = ModelConfig(vocab_size=32, hidden_size=128, intermediate_size=128, num_layers=1, num_heads=2,
                       num_kv_heads=1, hidden_act="relu2", rope_theta=10000.0, max_position_embeddings=64,
                       bos_token_id=1, eos_token_ids=(2,))
    return base.replace(**changes)


def write_micro(path: Path, qtype: str = "i2_s", seed: int = 0, **changes) -> tuple[ModelConfig, dict]:
    config = micro_config(**changes)
    weights = synthetic.random_weights(config, seed)
    write_gguf(path, config, weights, qtype)
    return config, weights


def rewrite(src: Path, dst: Path, *, set_fields: dict | None = None, drop_fields: tuple = (),
            drop_tensors: tuple = (), add_tensors: tuple = (), replace_tensors: dict | None = None) -> Path:
    """Copy a GGUF file with edited metadata/tensors (replace_tensors: name -> (type name, bytes))."""
    with GGUFReader(src) as reader:
        fields = {k: v for k, v in reader.fields.items() if k not in drop_fields}
        fields.update(set_fields or {})
        specs = []
        for name, info in reader.tensors.items():
            if name in drop_tensors:
                continue
            type_name, data = (replace_tensors or {}).get(name, (info.type.name, None))
            if data is None:
                data = reader.tensor_bytes(info).copy()
            specs.append(TensorSpec(name, info.shape, TYPE_BY_NAME[type_name], lambda d=data: d))
        specs += list(add_tensors)
        write_gguf_file(dst, fields, specs)
    return dst


def tensor_info_position(raw: bytes, name: str) -> tuple[int, int]:
    """Byte positions of the ggml type (u32) and data offset (u64) fields of tensor `name`'s info."""
    key = struct.pack("<Q", len(name)) + name.encode()
    start = raw.index(key) + len(key)
    n_dims = struct.unpack_from("<I", raw, start)[0]
    type_pos = start + 4 + 8 * n_dims
    return type_pos, type_pos + 4


def const_spec(name: str, array: np.ndarray, type_name: str = "F32") -> TensorSpec:
    return TensorSpec(name, tuple(array.shape), TYPE_BY_NAME[type_name], lambda: array)


@pytest.fixture
def micro_file(tmp_path: Path) -> Path:
    path = tmp_path / "micro.gguf"
    write_micro(path)
    return path


# ------------------------------------------------------------------------------------ container


def test_container_round_trip_all_value_types(tmp_path: Path):
    fields = {
        "u8": GGUFValue(ValueType.UINT8, 200), "i8": GGUFValue(ValueType.INT8, -100),
        "u16": GGUFValue(ValueType.UINT16, 60000), "i16": GGUFValue(ValueType.INT16, -30000),
        "u32": 4_000_000_000, "i32": -5, "f32": GGUFValue(ValueType.FLOAT32, 0.5), "bool": True,
        "str": "héllo", "u64": 2**40, "i64": -(2**40), "f64": GGUFValue(ValueType.FLOAT64, 1e-300),
        "ints": GGUFValue(ValueType.ARRAY, [1, -2, 3], ValueType.INT32), "strs": ["a", "", "ß"],
        "floats": GGUFValue(ValueType.ARRAY, [0.25, -1.5], ValueType.FLOAT32),
        "nested": GGUFValue(ValueType.ARRAY, [[1, 2], [3]], ValueType.ARRAY),
    }
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(64, dtype=np.float16)
    path = tmp_path / "c.gguf"
    write_gguf_file(path, fields, [const_spec("a", a), const_spec("b", b, "F16")], alignment=64)
    with GGUFReader(path) as reader:
        got = reader.metadata
        assert reader.version == 3 and reader.alignment == 64
        assert reader.fields["u8"].type == ValueType.UINT8 and reader.fields["u32"].type == ValueType.UINT32
        assert reader.fields["ints"].elem_type == ValueType.INT32
        assert all(info.data_offset % 64 == 0 for info in reader.tensors.values())
        assert reader.tensors["a"].shape == (3, 4) and reader.tensors["a"].ne == (4, 3)
        assert np.array_equal(reader.tensor_bytes(reader.tensors["a"]).view(np.float32).reshape(3, 4), a)
        assert np.array_equal(reader.tensor_bytes(reader.tensors["b"]).view(np.float16), b)
    expected = {k: (v.value if isinstance(v, GGUFValue) else v) for k, v in fields.items()}
    expected["general.alignment"] = 64
    assert got == expected


def test_our_writer_is_readable_by_gguf_py(tmp_path: Path):
    path = tmp_path / "c.gguf"
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    write_gguf_file(path, {"general.architecture": "bitnet", "x": 7, "names": ["p", "q"]}, [const_spec("a", a)])
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["x"].contents() == 7 and reader.fields["names"].contents() == ["p", "q"]
    (tensor,) = reader.tensors
    assert tensor.name == "a" and list(tensor.shape) == [4, 2] and np.array_equal(tensor.data, a)


def test_reads_files_written_by_gguf_py(tmp_path: Path):
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "bitnet")
    writer.add_block_count(3)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a"])
    w = np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)
    writer.add_tensor("t.weight", gguf.quants.quantize(w, gguf.GGMLQuantizationType.TQ2_0),
                      raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFReader(path) as reader:
        assert reader.metadata["bitnet.block_count"] == 3
        assert reader.metadata["tokenizer.ggml.tokens"] == ["<s>", "a"]
        info = reader.tensors["t.weight"]
        assert info.type.name == "TQ2_0" and info.shape == (2, 256) and info.nbytes == 2 * 66


def test_wrong_magic(micro_file: Path, tmp_path: Path):
    raw = bytearray(micro_file.read_bytes())
    raw[:4] = b"GGUX"
    (bad := tmp_path / "bad.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match=r"not a GGUF file: magic b'GGUX'"):
        load_gguf_weights(bad)


@pytest.mark.parametrize("version", [1, 4])
def test_unsupported_version(micro_file: Path, tmp_path: Path, version: int):
    raw = bytearray(micro_file.read_bytes())
    raw[4:8] = struct.pack("<I", version)
    (bad := tmp_path / "bad.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match=f"unsupported GGUF version {version}"):
        load_gguf_weights(bad)


@pytest.mark.parametrize("keep, message", [
    (0, "no GGUF header"),
    (3, "no GGUF header"),
    (20, r"truncated file: .*needs \d+ bytes at offset"),  # inside the counts
    (200, r"truncated file: .* at offset \d+"),  # inside the metadata
    (-10, r"tensor '.*' data \[\d+, \d+\) lies outside the file"),  # inside the last tensor
])
def test_truncated_file(micro_file: Path, tmp_path: Path, keep: int, message: str):
    raw = micro_file.read_bytes()
    (bad := tmp_path / "bad.gguf").write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    with pytest.raises(GGUFError, match=message):
        load_gguf_weights(bad)


def test_tensor_data_outside_the_file(micro_file: Path, tmp_path: Path):
    raw = bytearray(micro_file.read_bytes())
    _, offset_pos = tensor_info_position(bytes(raw), "blk.0.attn_q.weight")
    raw[offset_pos : offset_pos + 8] = struct.pack("<Q", 2**40)
    (bad := tmp_path / "bad.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_q\.weight' data \[\d+, \d+\) lies outside the file"):
        load_gguf_weights(bad)


def test_misaligned_tensor_offset(micro_file: Path, tmp_path: Path):
    raw = bytearray(micro_file.read_bytes())
    _, offset_pos = tensor_info_position(bytes(raw), "output_norm.weight")
    raw[offset_pos : offset_pos + 8] = struct.pack("<Q", struct.unpack_from("<Q", raw, offset_pos)[0] + 4)
    (bad := tmp_path / "bad.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match=r"'output_norm\.weight' data offset \d+ is not a multiple of the alignment 32"):
        load_gguf_weights(bad)


@pytest.mark.parametrize("type_id, message", [(99, "unknown ggml type"), (38, "TL1")])
def test_unknown_ggml_type(micro_file: Path, tmp_path: Path, type_id: int, message: str):
    raw = bytearray(micro_file.read_bytes())
    type_pos, _ = tensor_info_position(bytes(raw), "blk.0.ffn_up.weight")
    raw[type_pos : type_pos + 4] = struct.pack("<I", type_id)
    (bad := tmp_path / "bad.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match=rf"'blk\.0\.ffn_up\.weight' has ggml type {type_id}: .*{message}"):
        load_gguf_weights(bad)


def test_bad_alignment_and_value_type(micro_file: Path, tmp_path: Path):
    bad = rewrite(micro_file, tmp_path / "a.gguf", set_fields={"general.alignment": GGUFValue(ValueType.UINT32, 3)})
    with pytest.raises(GGUFError, match="general.alignment must be a u32 power of two, got 3"):
        load_gguf_weights(bad)
    raw = bytearray(micro_file.read_bytes())
    key = b"general.name"
    pos = raw.index(key) + len(key)
    raw[pos : pos + 4] = struct.pack("<I", 77)
    (bad := tmp_path / "b.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match=r"key 'general.name': unknown GGUF value type 77"):
        load_gguf_weights(bad)


# ---------------------------------------------------------------------------------------- loader


def test_shape_not_matching_config(micro_file: Path, tmp_path: Path):
    bad = rewrite(micro_file, tmp_path / "bad.gguf", set_fields={"bitnet-b1.58.feed_forward_length": 256})
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_sub_norm\.weight' has shape \[128\].*expected \[256\] from the metadata"):
        load_gguf_weights(bad)


def test_missing_tensor(micro_file: Path, tmp_path: Path):
    bad = rewrite(micro_file, tmp_path / "bad.gguf", drop_tensors=("blk.0.attn_k.weight",))
    with pytest.raises(GGUFError, match=r"missing tensor 'blk\.0\.attn_k\.weight' \(expected shape \[64, 128\]"):
        load_gguf_weights(bad)


def test_missing_and_mistyped_metadata(micro_file: Path, tmp_path: Path):
    bad = rewrite(micro_file, tmp_path / "a.gguf", drop_fields=("bitnet-b1.58.block_count",))
    with pytest.raises(GGUFError, match="missing metadata key 'bitnet-b1.58.block_count'"):
        load_gguf_weights(bad)
    bad = rewrite(micro_file, tmp_path / "b.gguf", set_fields={"bitnet-b1.58.block_count": "one"})
    with pytest.raises(GGUFError, match="'bitnet-b1.58.block_count' should be an integer, got STRING 'one'"):
        load_gguf_weights(bad)
    bad = rewrite(micro_file, tmp_path / "c.gguf", set_fields={"bitnet-b1.58.attention.head_count": 3})
    with pytest.raises(GGUFError, match="invalid model: hidden_size 128 is not divisible by num_heads 3"):
        load_gguf_weights(bad)


def test_unsupported_architecture(micro_file: Path, tmp_path: Path):
    bad = rewrite(micro_file, tmp_path / "bad.gguf", set_fields={"general.architecture": "llama"})
    with pytest.raises(GGUFError, match="unsupported architecture 'llama'"):
        load_gguf_weights(bad)


def _as_arch(src: Path, dst: Path, arch: str, activation: str | None) -> Path:
    """The same file under another architecture name (keys renamed), optionally with hidden_activation."""
    with GGUFReader(src) as reader:
        old = reader.metadata["general.architecture"]
        renamed = {k.replace(f"{old}.", f"{arch}.", 1): v for k, v in reader.fields.items() if k.startswith(f"{old}.")}
    renamed["general.architecture"] = arch
    if activation is not None:
        renamed[f"{arch}.hidden_activation"] = activation
    drop = tuple(k for k in read_gguf_metadata(src) if k.startswith(f"{old}."))
    return rewrite(src, dst, set_fields=renamed, drop_fields=drop)


@pytest.mark.parametrize("arch, activation, expected", [
    ("bitnet-b1.58", None, "relu2"),
    ("bitnet-25", None, "relu2"),
    ("bitnet", None, "silu"),  # llama.cpp's default for `bitnet`
    ("bitnet", "relu2", "relu2"),
    ("bitnet", "silu", "silu"),
])
def test_activation_rules(micro_file: Path, tmp_path: Path, arch: str, activation: str | None, expected: str):
    path = _as_arch(micro_file, tmp_path / "x.gguf", arch, activation)
    config, _ = load_gguf_weights(path)
    assert config.hidden_act == expected
    assert config.extra["gguf_architecture"] == arch


def test_unknown_activation(micro_file: Path, tmp_path: Path):
    path = _as_arch(micro_file, tmp_path / "x.gguf", "bitnet", "gelu")
    with pytest.raises(GGUFError, match="unsupported bitnet.hidden_activation 'gelu'"):
        load_gguf_weights(path)


def test_writer_metadata_for_llama_cpp(tmp_path: Path):
    config = micro_config(hidden_size=256, intermediate_size=256, head_dim=0)
    weights = synthetic.random_weights(config, 0)
    expectations = {"i2_s": ("bitnet-b1.58", 40), "tq2_0": ("bitnet", 37), "tq1_0": ("bitnet", 36), "f16": ("bitnet", 1)}
    for qtype, (arch, file_type) in expectations.items():
        path = tmp_path / f"{qtype}.gguf"
        write_gguf(path, config, weights, qtype)
        with GGUFReader(path) as reader:
            meta = reader.metadata
            assert meta["general.architecture"] == arch and meta["general.file_type"] == file_type
            assert meta["tokenizer.ggml.model"] == "no_vocab"
            assert reader.fields[f"{arch}.block_count"].type == ValueType.UINT32
            assert reader.fields[f"{arch}.attention.layer_norm_rms_epsilon"].type == ValueType.FLOAT32
            assert meta.get("bitnet.hidden_activation") == ("relu2" if arch == "bitnet" else None)
            assert reader.tensors["blk.0.attn_q.weight"].type.name == qtype.upper()
            assert reader.tensors["token_embd.weight"].type.name == "F16"
            assert reader.tensors["output_norm.weight"].type.name == "F32"
        loaded_config, loaded = load_gguf_weights(path)
        assert loaded_config == config
        for name, w in weights.items():
            if isinstance(w, TernaryWeight):
                assert torch.equal(loaded[name].values, w.values), (qtype, name)
    # SiLU models in I2_S keep bitnet.cpp's `bitnet` arch, whose graph is SiLU
    silu = config.replace(hidden_act="silu")
    write_gguf(tmp_path / "silu.gguf", silu, weights, "i2_s")
    assert read_gguf_metadata(tmp_path / "silu.gguf")["general.architecture"] == "bitnet"
    assert load_gguf_weights(tmp_path / "silu.gguf")[0].hidden_act == "silu"


def test_writer_rejects_what_the_format_cannot_hold(tmp_path: Path):
    config = micro_config()  # rows of 128: not a TQ block
    weights = synthetic.random_weights(config, 0)
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.weight' has rows of 128 elements, not a multiple of 256"):
        write_gguf(tmp_path / "x.gguf", config, weights, "tq2_0")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ConfigError, match="unknown GGUF type 'q4_0'"):
        write_gguf(tmp_path / "x.gguf", config, weights, "q4_0")
    del weights["layers.0.up_proj"]
    with pytest.raises(CheckpointError, match="missing tensor 'layers.0.up_proj'"):
        write_gguf(tmp_path / "x.gguf", config, weights, "i2_s")


def test_scale_tensors_fold_into_beta(micro_file: Path, tmp_path: Path):
    _, plain = load_gguf_weights(micro_file)
    scale = const_spec("blk.0.attn_q.scale", np.array([2.5], dtype=np.float32))
    path = rewrite(micro_file, tmp_path / "s.gguf", add_tensors=(scale,))
    _, scaled = load_gguf_weights(path)
    assert torch.equal(scaled["layers.0.q_proj"].values, plain["layers.0.q_proj"].values)
    assert scaled["layers.0.q_proj"].beta == plain["layers.0.q_proj"].beta * 2.5
    assert scaled["layers.0.k_proj"].beta == plain["layers.0.k_proj"].beta
    bad = const_spec("blk.0.attn_q.scale", np.array([1.0, 2.0], dtype=np.float32))
    with pytest.raises(GGUFError, match=r"scale tensor 'blk\.0\.attn_q\.scale' must be one F32/F16 value"):
        load_gguf_weights(rewrite(micro_file, tmp_path / "b.gguf", add_tensors=(bad,)))


def test_untied_output_tensor(tmp_path: Path):
    path = tmp_path / "u.gguf"
    config, weights = write_micro(path, tie_word_embeddings=False)
    loaded_config, loaded = load_gguf_weights(path)
    assert loaded_config.tie_word_embeddings is False
    assert torch.equal(loaded["lm_head"], weights["lm_head"].to(torch.float16))
    with GGUFReader(path) as reader:
        assert reader.tensors["output.weight"].shape == (32, 128)


def test_embedding_dtypes(micro_file: Path, tmp_path: Path):
    config = micro_config()
    weights = synthetic.random_weights(config, 0)
    for embed_type, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16), ("f32", torch.float32)):
        path = tmp_path / f"{embed_type}.gguf"
        write_gguf(path, config, weights, "i2_s", embed_type=embed_type)
        embed = load_gguf_weights(path)[1]["embed_tokens"]
        assert embed.dtype == dtype and torch.equal(embed, weights["embed_tokens"].to(dtype))
    # a Q8_0 embedding (bitnet.cpp --quant-embd) stays in its blocks; its rows read as gguf-py dequantizes them
    dense = weights["embed_tokens"].float().numpy()  # (32, 128)
    q8 = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q8_0)
    path = rewrite(micro_file, tmp_path / "q8.gguf", replace_tensors={"token_embd.weight": ("Q8_0", q8)})
    embed = load_gguf_weights(path)[1]["embed_tokens"]
    assert isinstance(embed, QuantizedTable) and tuple(embed.shape) == dense.shape
    rows = embed[torch.arange(dense.shape[0])]
    assert rows.dtype == torch.float32
    assert np.array_equal(rows.numpy(), gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0))


def test_float_projection_must_be_ternary(tmp_path: Path):
    path = tmp_path / "f.gguf"
    config, weights = write_micro(path, qtype="f16")
    _, loaded = load_gguf_weights(path)
    q = weights["layers.0.q_proj"]
    assert torch.equal(loaded["layers.0.q_proj"].values, q.values)
    assert loaded["layers.0.q_proj"].beta == float(np.float16(q.beta))
    noisy = (q.values.float() * q.beta + 1e-3 * torch.randn(q.shape)).to(torch.float16).numpy()
    bad = rewrite(path, tmp_path / "bad.gguf", replace_tensors={"blk.0.attn_q.weight": ("F16", noisy)})
    with pytest.raises(GGUFError, match=r"float projection 'blk\.0\.attn_q\.weight' is not ternary \* scale"):
        load_gguf_weights(bad)


def test_i2s_embedding_is_refused(micro_file: Path, tmp_path: Path):
    data = np.zeros(32 * 128 // 4 + 32, dtype=np.uint8)
    bad = rewrite(micro_file, tmp_path / "bad.gguf", replace_tensors={"token_embd.weight": ("I2_S", data)})
    with pytest.raises(GGUFError, match=r"'token_embd\.weight' is I2_S, which only ternary projections may use"):
        load_gguf_weights(bad)


def test_read_gguf_metadata_and_tokenizer_keys(tmp_path: Path):
    config = micro_config()
    weights = synthetic.random_weights(config, 0)
    tokens = [f"t{i}" for i in range(32)]
    tokenizer = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                 "tokenizer.ggml.token_type": [1] * 32, "tokenizer.ggml.merges": ["t 1"],
                 "tokenizer.ggml.add_bos_token": True}
    path = tmp_path / "tok.gguf"
    write_gguf(path, config, weights, "i2_s", tokenizer_metadata=tokenizer)
    meta = read_gguf_metadata(path)
    assert meta["tokenizer.ggml.tokens"] == tokens and meta["tokenizer.ggml.merges"] == ["t 1"]
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["bitnet-b1.58.block_count"] == 1
    with GGUFReader(path) as reader:  # llama.cpp reads token types as int32
        assert reader.fields["tokenizer.ggml.token_type"].elem_type == ValueType.INT32
    with pytest.raises(GGUFError, match="'vocab.size' does not start with 'tokenizer.'"):
        write_gguf(path, config, weights, "i2_s", tokenizer_metadata={"vocab.size": 3})


def test_python_lists_get_one_wide_enough_element_type(tmp_path: Path):
    from pybitnet.loaders.gguf_file import infer_value

    assert infer_value([0, 0.5]).elem_type == ValueType.FLOAT32  # not truncated to the first element's u32
    assert infer_value([1, -2]).elem_type == ValueType.INT32
    assert infer_value([1, 2**40]).elem_type == ValueType.UINT64
    with pytest.raises(GGUFError, match=r"cannot store a list mixing \['STRING', 'UINT32'\]"):
        infer_value(["a", 1])
    path = tmp_path / "l.gguf"
    write_gguf_file(path, {"scores": [0, 0.5, -1.25]}, [])
    assert read_gguf_metadata(path)["scores"] == [0.0, 0.5, -1.25]
