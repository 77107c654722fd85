"""Checkpoints whose values or config would give wrong numbers or unbounded work are refused at load,
with the tensor, key or file named: non-finite tensors and scales, impossible RoPE/RMSNorm constants,
config.json of the wrong type or shape, and files named outside the model directory."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pybitnet
from pybitnet import CheckpointError, ConfigError, PyBitNetError, synthetic
from pybitnet.loaders.gguf import write_gguf
from pybitnet.loaders.gguf_file import GGUFReader, GGUFValue, TensorSpec, ValueType, write_gguf_file
from pybitnet.loaders.hf import save_hf

TINY = pybitnet.preset("tiny")
TINY_256 = TINY.replace(hidden_size=256, intermediate_size=512, head_dim=64)  # TQ types need 256-element rows


# -- Hugging Face directories -------------------------------------------------------------------------------


def _hf(tmp_path, config=TINY):
    save_hf(tmp_path, config, synthetic.random_weights(config, 0), float_dtype=torch.float32)
    return tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensor(path, hf_name, edit):
    tensors = load_file(str(path / "model.safetensors"))
    tensors[hf_name] = edit(tensors[hf_name].clone())
    save_file(tensors, str(path / "model.safetensors"))


def _poison(value):
    def edit(t):
        t.view(-1)[t.numel() // 2] = value
        return t
    return edit


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("hf_name", [
    "model.layers.1.self_attn.k_proj.weight_scale", "model.embed_tokens.weight",
    "model.layers.0.post_attention_layernorm.weight", "model.layers.1.mlp.ffn_sub_norm.weight", "model.norm.weight",
])
def test_non_finite_hf_tensor_is_refused_by_name(tmp_path, hf_name, value):
    _edit_tensor(_hf(tmp_path), hf_name, _poison(value))
    with pytest.raises(CheckpointError, match=hf_name.removesuffix("_scale").removesuffix(".weight")):
        pybitnet.load(tmp_path)


@pytest.mark.parametrize("value", [0.0, -0.5])
def test_zero_or_negative_weight_scale_is_refused(tmp_path, value):
    _edit_tensor(_hf(tmp_path), "model.layers.0.mlp.up_proj.weight_scale", lambda t: torch.full_like(t, value))
    with pytest.raises(CheckpointError, match="up_proj"):
        pybitnet.load(tmp_path)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_float_master_weight_is_refused_by_name(tmp_path, value):
    _hf(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith("weight_scale")]:
        packed = tensors.pop(name[: -len("_scale")])
        del tensors[name]
        tensors[name[: -len("_scale")]] = torch.randn(packed.shape[0] * 4, packed.shape[1], generator=g) * 0.02
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        pybitnet.load(tmp_path)


@pytest.mark.parametrize("key,value", [
    ("rope_theta", 0), ("rope_theta", -10000.0), ("rope_theta", math.nan), ("rope_theta", math.inf),
    ("rms_norm_eps", -1e-6), ("rms_norm_eps", math.nan), ("max_position_embeddings", 0),
])
def test_impossible_rope_theta_or_rms_eps_is_refused(tmp_path, key, value):
    _edit_config(_hf(tmp_path), **{key: value})  # json.dumps writes NaN / Infinity, which json.loads reads back
    with pytest.raises(ConfigError, match=key):
        pybitnet.load(tmp_path)


# -- config.json robustness ---------------------------------------------------------------------------------


def test_huge_layer_count_fails_fast_with_bounded_memory(tmp_path):
    _edit_config(_hf(tmp_path), num_hidden_layers=10**7)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="num_hidden_layers"):
            pybitnet.load(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # the tiny checkpoint itself is ~1 MB; 10**7 layers' tables would be gigabytes


def test_fewer_layers_than_the_checkpoint_is_our_error(tmp_path):
    _edit_config(_hf(tmp_path), num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="num_hidden_layers.*1.*2 layers"):
        pybitnet.load(tmp_path)


@pytest.mark.parametrize("key,value", [
    ("hidden_size", "128"), ("num_attention_heads", None), ("vocab_size", 512.5), ("num_hidden_layers", True),
    ("rope_theta", "fast"), ("rms_norm_eps", [1e-5]), ("max_position_embeddings", {"a": 1}),
    ("quantization_config", "bitnet"), ("architectures", "BitNetForCausalLM"), ("eos_token_id", "x"),
    ("tie_word_embeddings", "yes"), ("hidden_act", 3),
])
def test_wrong_type_in_config_names_the_key(tmp_path, key, value):
    _edit_config(_hf(tmp_path), **{key: value})
    with pytest.raises(ConfigError, match=key):
        pybitnet.load(tmp_path)


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{\x00}", "UTF-8"), (b"[1, 2, 3]", "JSON object"), (b"{\"vocab_size\": ", "invalid JSON"),
])
def test_unreadable_config_json_is_named(tmp_path, content, match):
    _hf(tmp_path)
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"config.json.*{match}|{match}.*config.json"):
        pybitnet.load(tmp_path)


def _sharded(tmp_path):
    save_hf(tmp_path, TINY, synthetic.random_weights(TINY, 0), float_dtype=torch.float32, max_shard_bytes=60_000)
    return json.loads((tmp_path / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("outside", ["../elsewhere.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_directory_is_refused(tmp_path, outside):
    model_dir = tmp_path / "model"
    index = _sharded(model_dir)
    name, shard = next(iter(index["weight_map"].items()))
    (tmp_path / "elsewhere.safetensors").write_bytes((model_dir / shard).read_bytes())  # a real file out there
    index["weight_map"][name] = outside
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        pybitnet.load(model_dir)


@pytest.mark.parametrize("index", [b"[]", b"{\"weight_map\": [1]}", b"{\"weight_map\": {\"a\": 3}}", b"\xff"])
def test_malformed_index_is_named(tmp_path, index):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        pybitnet.load(tmp_path)


# -- GGUF files ---------------------------------------------------------------------------------------------


def _rewrite_gguf(src, dst, fields=None, tensor_edits=None):
    """Copy a GGUF file with some metadata values replaced and some tensors' bytes edited."""
    with GGUFReader(src) as reader:
        new_fields = dict(reader.fields)
        new_fields.update(fields or {})
        specs = []
        for info in reader.tensors.values():
            data = reader.tensor_bytes(info).copy()
            if tensor_edits and info.name in tensor_edits:
                data = tensor_edits[info.name](data)
            specs.append(TensorSpec(info.name, info.shape, info.type, lambda data=data: data))
        write_gguf_file(dst, new_fields, specs)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    weights = synthetic.random_weights(TINY_256, 0)
    files = {}
    for qtype in ("i2_s", "tq2_0", "tq1_0"):
        files[qtype] = root / f"tiny-{qtype}.gguf"
        write_gguf(files[qtype], TINY_256, weights, qtype)
    return files


@pytest.mark.parametrize("key,value", [
    ("bitnet-b1.58.rope.freq_base", 0.0), ("bitnet-b1.58.rope.freq_base", -1.0),
    ("bitnet-b1.58.rope.freq_base", math.nan), ("bitnet-b1.58.attention.layer_norm_rms_epsilon", -1e-5),
    ("bitnet-b1.58.attention.layer_norm_rms_epsilon", math.nan),
])
def test_gguf_impossible_rope_theta_or_rms_eps_is_refused(gguf_files, tmp_path, key, value):
    bad = tmp_path / "bad.gguf"
    _rewrite_gguf(gguf_files["i2_s"], bad, {key: GGUFValue(ValueType.FLOAT32, value)})
    with pytest.raises(CheckpointError, match="rope_theta|rms_norm_eps"):
        pybitnet.load(bad)


def _i2s_scale(value):
    def edit(data):
        n_packed = data.size - 32  # n/4 packed bytes, then the fp32 scale and padding
        data[n_packed : n_packed + 4] = np.frombuffer(np.float32(value).tobytes(), dtype=np.uint8)
        return data
    return edit


@pytest.mark.parametrize("value", [0.0, -0.25, math.inf, math.nan])
def test_gguf_i2s_scale_that_is_not_positive_and_finite_is_refused(gguf_files, tmp_path, value):
    bad = tmp_path / "bad.gguf"
    _rewrite_gguf(gguf_files["i2_s"], bad, tensor_edits={"blk.1.ffn_down.weight": _i2s_scale(value)})
    with pytest.raises(CheckpointError, match="down_proj|ffn_down"):
        pybitnet.load(bad)


@pytest.mark.parametrize("qtype,block_bytes", [("tq2_0", 66), ("tq1_0", 54)])
def test_gguf_tq_tensor_with_only_zero_scales_is_refused(gguf_files, tmp_path, qtype, block_bytes):
    def zero_scales(data):
        blocks = data.reshape(-1, block_bytes)
        blocks[:, -2:] = 0
        return data
    bad = tmp_path / "bad.gguf"
    _rewrite_gguf(gguf_files[qtype], bad, tensor_edits={"blk.0.attn_v.weight": zero_scales})
    with pytest.raises(CheckpointError, match="v_proj|attn_v"):
        pybitnet.load(bad)


@pytest.mark.parametrize("qtype,block_bytes", [("tq2_0", 66), ("tq1_0", 54)])
def test_gguf_tq_negative_block_scale_is_refused(gguf_files, tmp_path, qtype, block_bytes):
    def negate_one_scale(data):
        blocks = data.reshape(-1, block_bytes)
        blocks[3, -1] |= 0x80  # the sign bit of block 3's fp16 scale
        return data
    bad = tmp_path / "bad.gguf"
    _rewrite_gguf(gguf_files[qtype], bad, tensor_edits={"blk.1.ffn_gate.weight": negate_one_scale})
    with pytest.raises(CheckpointError, match="ffn_gate.*negative scale.*block 3"):
        pybitnet.load(bad)


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.0.attn_norm.weight", "output_norm.weight"])
def test_gguf_non_finite_float_tensor_is_refused_by_name(gguf_files, tmp_path, tensor):
    def poison(data):
        floats = data.view(np.float16 if tensor == "token_embd.weight" else np.float32)
        floats[floats.size // 3] = np.inf
        return data
    bad = tmp_path / "bad.gguf"
    _rewrite_gguf(gguf_files["i2_s"], bad, tensor_edits={tensor: poison})
    internal = {"token_embd.weight": "embed_tokens", "blk.0.attn_norm.weight": "input_layernorm",
                "output_norm.weight": "norm"}[tensor]
    with pytest.raises(CheckpointError, match=internal):
        pybitnet.load(bad)


def test_gguf_errors_are_pybitnet_errors(gguf_files, tmp_path):
    bad = tmp_path / "bad.gguf"
    _rewrite_gguf(gguf_files["tq2_0"], bad, {"bitnet.rope.freq_base": GGUFValue(ValueType.FLOAT32, math.nan)})
    with pytest.raises(PyBitNetError, match="rope_theta"):
        pybitnet.load(bad)


# -- tokenizer files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer_config.json", b"\xff\xfe{}", "tokenizer_config.json"),
    ("tokenizer_config.json", b"[\"<s>\"]", "tokenizer_config.json.*JSON object"),
    ("generation_config.json", b"{\"eos_token_id\": \"x\"}", "generation_config.json.*eos_token_id"),
    ("generation_config.json", b"{\"eos_token_id\": [2, null]}", "generation_config.json.*eos_token_id"),
])
def test_unreadable_tokenizer_files_are_named(tmp_path, name, content, match):
    from pybitnet.loaders import convert
    from pybitnet import load_tokenizer

    model_dir = convert("synthetic:tiny", tmp_path / "model")
    (model_dir / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_tokenizer(model_dir)


@pytest.mark.parametrize("change,match", [
    ({"tokenizer.ggml.tokens": 5}, "malformed tokenizer metadata"),
    ({"tokenizer.ggml.token_type": ["a"] * 512}, "malformed tokenizer metadata"),
    ({"tokenizer.ggml.bos_token_id": "x"}, "malformed tokenizer metadata"),
    ({"tokenizer.ggml.tokens": [None] * 512}, "malformed tokenizer metadata"),
    ({"tokenizer.ggml.eot_token_id": 10**12}, "stop token ids .* outside the vocabulary"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0]}, "scores has 1 entries"),
])
def test_malformed_gguf_tokenizer_metadata_is_named(change, match):
    from pybitnet.synthetic import synthetic_tokenizer_metadata
    from pybitnet.tokenizer import Tokenizer

    metadata = {**synthetic_tokenizer_metadata(TINY), **change}
    with pytest.raises(CheckpointError, match=f"bad.gguf: .*{match}"):
        Tokenizer.from_gguf_metadata(metadata, source="bad.gguf")
