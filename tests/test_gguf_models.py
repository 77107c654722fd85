"""GGUF models end to end: I2_S, TQ1_0, TQ2_0 and F16 files of the tiny and a 2-layer 2B-4T shape run
through pybitnet.load with logits equal to the HF-loaded twin of the same weights.

The weights are made exactly representable in both formats first (norms in bf16, which the HF
writer stores; betas in fp16, which TQ/F16 blocks store), so "same model" means bit-identical
parameters and the logits must be equal, not close. The embedding is the one parameter whose
dtype differs by format (HF bf16, GGUF F16 by default): with a BF16 GGUF embedding the logits
equal the HF twin's; with F16 they equal a twin holding the same F16 embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pybitnet
from pybitnet import preset, synthetic
from pybitnet.config import ModelConfig
from pybitnet.loaders.gguf import load_gguf_weights, write_gguf
from pybitnet.loaders.hf import load_hf_weights, save_hf
from pybitnet.model import Transformer
from pybitnet.weights import TernaryWeight, Weights

TOKENS = torch.tensor([[1, 5, 9, 200, 3, 77, 14, 2], [7, 7, 100, 31, 0, 255, 16, 8]])  # (B=2, T=8)
TINY = preset("tiny")
TINY_256 = TINY.replace(hidden_size=256, intermediate_size=512, head_dim=0)  # TQ blocks need rows of 256
B158_2L = preset("bitnet-b1.58-2b-4t").replace(num_layers=2)


def representable_weights(config: ModelConfig, seed: int) -> Weights:
    """random_weights, with norms rounded to bf16 and betas to fp16 so every format holds them exactly."""
    weights = synthetic.random_weights(config, seed)
    for name, value in weights.items():
        if isinstance(value, TernaryWeight):
            weights[name] = TernaryWeight(value.values, float(np.float16(value.beta)))
        elif name not in ("embed_tokens", "lm_head"):
            weights[name] = value.to(torch.bfloat16).float()
    return weights


def assert_same_ternaries(a: Weights, b: Weights) -> None:
    names = sorted(n for n, v in a.items() if isinstance(v, TernaryWeight))
    assert names and names == sorted(n for n, v in b.items() if isinstance(v, TernaryWeight))
    for name in names:
        assert a[name].values.dtype == b[name].values.dtype == torch.int8, name
        assert torch.equal(a[name].values, b[name].values), name
        assert a[name].beta == b[name].beta, name


class Twin:
    """A model's weights, its HF checkpoint, and the HF-loaded logits for TOKENS."""

    def __init__(self, config: ModelConfig, seed: int, folder: Path):
        self.config = config
        self.weights = representable_weights(config, seed)
        self.hf_dir = save_hf(folder / "hf", config, self.weights)
        self.hf_config, self.hf_weights, _ = load_hf_weights(self.hf_dir)
        self.logits = pybitnet.load(self.hf_dir).forward_full(self.tokens)  # (B, T, V)

    @property
    def tokens(self) -> torch.Tensor:
        return TOKENS % self.config.vocab_size

    def logits_with_embedding(self, dtype: torch.dtype) -> torch.Tensor:
        weights = dict(self.hf_weights)
        weights["embed_tokens"] = weights["embed_tokens"].to(dtype)
        return Transformer(self.hf_config, weights).forward_full(self.tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Twin:
    return Twin(TINY, 11, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_256(tmp_path_factory) -> Twin:
    return Twin(TINY_256, 12, tmp_path_factory.mktemp("tiny256"))


@pytest.fixture(scope="module")
def b158_2layers(tmp_path_factory) -> Twin:
    return Twin(B158_2L, 13, tmp_path_factory.mktemp("b158"))


def check_gguf_twin(twin: Twin, qtype: str, path: Path, embed_type: str) -> None:
    write_gguf(path, twin.config, twin.weights, qtype, embed_type=embed_type)
    config, weights = load_gguf_weights(path)
    assert config == twin.hf_config
    # the HF writer and the GGUF writer load back to identical ternary weights
    assert_same_ternaries(weights, twin.hf_weights)
    model = pybitnet.load(path)
    assert model.embed_tokens.dtype == {"bf16": torch.bfloat16, "f16": torch.float16}[embed_type]
    logits = model.forward_full(twin.tokens)
    if embed_type == "bf16":
        assert torch.equal(logits, twin.logits)
    else:
        assert torch.equal(logits, twin.logits_with_embedding(torch.float16))
        # and the F16 embedding moves the logits only by its rounding
        torch.testing.assert_close(logits, twin.logits, rtol=0, atol=1e-2 * twin.logits.abs().max().item())


@pytest.mark.parametrize("qtype", ["i2_s", "f16"])
@pytest.mark.parametrize("embed_type", ["bf16", "f16"])
def test_tiny(tiny: Twin, tmp_path: Path, qtype: str, embed_type: str):
    # the tiny preset's rows of 128 fit I2_S (128-element blocks) but not TQ (256): see test_tiny_256
    check_gguf_twin(tiny, qtype, tmp_path / f"tiny-{qtype}.gguf", embed_type)


@pytest.mark.parametrize("qtype", ["i2_s", "tq1_0", "tq2_0", "f16"])
def test_tiny_256(tiny_256: Twin, tmp_path: Path, qtype: str):
    check_gguf_twin(tiny_256, qtype, tmp_path / f"tiny256-{qtype}.gguf", "bf16")


@pytest.mark.parametrize("qtype", ["i2_s", "tq1_0", "tq2_0", "f16"])
def test_2b4t_shape_two_layers(b158_2layers: Twin, tmp_path: Path, qtype: str):
    check_gguf_twin(b158_2layers, qtype, tmp_path / f"b158-{qtype}.gguf", "f16")


def test_i2s_file_size_matches_formats_b3(b158_2layers: Twin, tmp_path: Path):
    # docs/formats.md per layer: 2*(2560*2560/4+32) + 2*(2560*640/4+32) + 3*(2560*6912/4+32) I2_S bytes,
    # 4 F32 norms (3*2560 + 6912 floats); plus output_norm and the F16 embedding 128256*2560*2.
    path = tmp_path / "size.gguf"
    write_gguf(path, B158_2L, b158_2layers.weights, "i2_s")
    i2s_per_layer = 2 * (2560 * 2560 // 4 + 32) + 2 * (2560 * 640 // 4 + 32) + 3 * (2560 * 6912 // 4 + 32)
    norms_per_layer = 4 * (3 * 2560 + 6912)
    expected = 2 * (i2s_per_layer + norms_per_layer) + 4 * 2560 + 128256 * 2560 * 2
    from pybitnet.loaders.gguf_file import GGUFReader

    with GGUFReader(path) as reader:
        data_bytes = reader.file_size - reader.data_start
        assert sum(info.nbytes for info in reader.tensors.values()) == expected
        assert data_bytes == expected  # every size is a multiple of 32: no padding between tensors
