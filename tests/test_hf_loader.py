"""HF checkpoints: round trips through our writer, float master weights, and every bad-input error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pybitnet
from pybitnet import CheckpointError, ConfigError, synthetic
from pybitnet.loaders.hf import load_hf_weights, save_hf
from pybitnet.quant.hf_pack import pack_hf, unpack_hf
from pybitnet.quant.ternary import absmean_ternarize
from pybitnet.weights import TernaryWeight

TINY = pybitnet.preset("tiny")


def _write(tmp_path, config=TINY, seed=0, **kw):
    weights = synthetic.random_weights(config, seed, embed_dtype=torch.float32)
    save_hf(tmp_path, config, weights, float_dtype=torch.float32, **kw)
    return weights


def test_pack_layout_matches_formats_a5():
    # column 0 holds rows 0..7 = [-1, 0, 1, 1, 0, -1, 1, 0]; P = 2 -> byte[p] = rows p, p+2, p+4, p+6
    t = torch.tensor([[-1], [0], [1], [1], [0], [-1], [1], [0]], dtype=torch.int8)
    packed = pack_hf(t)
    # byte 0: rows 0,2,4,6 -> codes 0,2,1,2 -> 0 | 2<<2 | 1<<4 | 2<<6 = 0 + 8 + 16 + 128 = 152
    # byte 1: rows 1,3,5,7 -> codes 1,2,0,1 -> 1 | 2<<2 | 0<<4 | 1<<6 = 1 + 8 + 0 + 64 = 73
    assert packed[:, 0].tolist() == [152, 73]
    assert torch.equal(unpack_hf(packed, 8), t)


def test_pack_roundtrip_with_rows_not_divisible_by_four():
    t = torch.randint(-1, 2, (13, 7), dtype=torch.int8)
    assert torch.equal(unpack_hf(pack_hf(t), 13), t)


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
@pytest.mark.parametrize("shard", [None, 60_000])
def test_roundtrip_identical_ternaries_and_scales(tmp_path, linear_class, shard):
    weights = _write(tmp_path, linear_class=linear_class, max_shard_bytes=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    config, loaded, info = load_hf_weights(tmp_path)
    assert config == TINY.replace(extra={}) and info["packed"]
    for name, w in weights.items():
        if isinstance(w, TernaryWeight):
            assert torch.equal(loaded[name].values, w.values), name
            assert loaded[name].beta == pytest.approx(w.beta, rel=1e-6), name
    model = pybitnet.load(tmp_path, dtype=torch.float64)
    stored = {n: TernaryWeight(w.values, _as_stored(w.beta, linear_class)) if isinstance(w, TernaryWeight) else w
              for n, w in weights.items()}  # β as the fp32 weight_scale on disk holds it
    twin = pybitnet.Transformer(TINY, stored, dtype=torch.float64)
    tokens = torch.randint(0, TINY.vocab_size, (1, 20))
    assert torch.allclose(model.forward_full(tokens), twin.forward_full(tokens), rtol=1e-12, atol=1e-12)


def _as_stored(beta: float, linear_class: str) -> float:
    if linear_class == "autobitlinear":
        return float(torch.tensor(beta, dtype=torch.float32))
    return 1.0 / float(torch.tensor(1.0 / beta, dtype=torch.float32))


def test_bitlinear_scale_is_inverted(tmp_path):
    _write(tmp_path, linear_class="bitlinear")
    raw = load_file(str(tmp_path / "model.safetensors"))
    _, loaded, _ = load_hf_weights(tmp_path)
    scale = float(raw["model.layers.0.self_attn.q_proj.weight_scale"][0])
    assert loaded["layers.0.q_proj"].beta == pytest.approx(1.0 / scale)


def test_untied_lm_head_is_used(tmp_path):
    config = TINY.replace(tie_word_embeddings=False)
    weights = _write(tmp_path, config)
    model = pybitnet.load(tmp_path, dtype=torch.float64)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, weights["lm_head"].double())


def _float_master_checkpoint(tmp_path, names_1bitllm: bool):
    """A `-bf16`-style (or 1bitLLM-style) checkpoint: float projection weights, no weight_scale."""
    config = TINY.replace(hidden_act="silu" if names_1bitllm else "relu2")
    g = torch.Generator().manual_seed(0)
    save_hf(tmp_path, config, synthetic.random_weights(config, 0), float_dtype=torch.float32)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    masters = {}
    for name in list(tensors):
        if name.endswith(".weight_scale"):
            del tensors[name]
        elif tensors[name].dtype == torch.uint8:
            out = tensors[name].shape[0] * 4
            masters[name] = tensors[name] = (torch.randn(out, tensors[name].shape[1], generator=g) * 0.02).to(torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if names_1bitllm:
        cfg["architectures"] = ["BitnetForCausalLM"]
        cfg["model_type"] = "llama"
        cfg.pop("quantization_config")
        tensors = {n.replace("attn_sub_norm", "inner_attn_ln").replace("ffn_sub_norm", "ffn_layernorm"): t
                   for n, t in tensors.items()}
    else:
        cfg["quantization_config"]["quantization_mode"] = "online"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return config, masters


@pytest.mark.parametrize("names_1bitllm", [False, True])
def test_float_master_weights_are_ternarized_with_absmean(tmp_path, names_1bitllm):
    config, masters = _float_master_checkpoint(tmp_path, names_1bitllm)
    loaded_config, loaded, info = load_hf_weights(tmp_path)
    assert not info["packed"] and loaded_config.hidden_act == config.hidden_act
    w = masters["model.layers.1.mlp.down_proj.weight"].float()
    beta = w.abs().mean().item()  # absmean, worked out independently of the package
    expected = (w / beta).round().clamp(-1, 1).to(torch.int8)
    assert loaded["layers.1.down_proj"].beta == pytest.approx(beta, rel=1e-6)
    assert torch.equal(loaded["layers.1.down_proj"].values, expected)
    assert absmean_ternarize(w)[1] == pytest.approx(beta, rel=1e-6)
    if names_1bitllm:
        assert "layers.0.attn_sub_norm" in loaded and "layers.0.ffn_sub_norm" in loaded


def _threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_absmean_beta_is_the_same_bits_with_any_thread_count():
    """β of bf16 masters with 1, 2 and 3 torch threads: the same bits, equal to the exact mean of |W|
    rounded to float32 (math.fsum, independent of the package). A float32 reduction split between
    threads gave betas one ulp apart for some of these weights."""
    import math

    import numpy as np

    from pybitnet.train.qat import ternarize

    for seed in range(8):
        w = (torch.randn(256, 768, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()  # (N, K)
        exact = float(np.float32(math.fsum(w.double().abs().flatten().tolist()) / w.numel()))
        for threads in (1, 2, 3):
            values, beta = _threads(threads, lambda: absmean_ternarize(w))
            assert beta == exact, (seed, threads, beta, exact)
            assert torch.equal(values, (w.float() / beta).round().clamp(-1, 1).to(torch.int8))
            # training ternarizes (and exports) its float32 latent weights with the same β
            trained_values, trained_beta = _threads(threads, lambda: ternarize(w.float()))
            assert trained_beta.dtype == torch.float32 and float(trained_beta) == exact, (seed, threads)
            assert torch.equal(trained_values.to(torch.int8), values)


# ------------------------------------------------------------------------------------ bad input
def test_missing_tensor_is_named(tmp_path):
    _write(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' \(layers\.1\.up_proj\)"):
        pybitnet.load(tmp_path)


def test_missing_weight_scale_is_named(tmp_path):
    _write(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight_scale"):
        pybitnet.load(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    _write(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"][:, :64].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*shape \[32, 64\].*expected \[32, 128\]"):
        pybitnet.load(tmp_path)


def test_wrong_norm_shape_is_named(tmp_path):
    _write(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' \(norm\) has shape \[7\], expected \[128\]"):
        pybitnet.load(tmp_path)


def test_non_ternary_packed_value_is_named(tmp_path):
    _write(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.1.mlp.gate_proj.weight"][3, 5] = 0b11  # code 3 is not a ternary value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight.*non-ternary"):
        pybitnet.load(tmp_path)


def test_truncated_file_is_named(tmp_path):
    _write(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        pybitnet.load(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["MistralForCausalLM"]}, "unknown architecture"),
    ({"hidden_act": "gelu"}, "unknown activation hidden_act='gelu'"),
    ({"num_attention_heads": 3}, "not divisible|not a multiple"),
])
def test_bad_config_is_named(tmp_path, change, match):
    _write(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        pybitnet.load(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        pybitnet.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        pybitnet.load(tmp_path / "nope")
