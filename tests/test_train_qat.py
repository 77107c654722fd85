"""Quantization-aware training: the training forward is the inference math, and its gradients are right.

- An exported model's inference logits equal the training forward's (float64: <= 1e-12 relative).
- Loss and every parameter's gradient against an independent float64 reference written here from the
  BitNet b1.58 definition (straight-through estimators as x + (quant(x) - x).detach()), <= 1e-9.
- Loss and every gradient against transformers' BitNetForCausalLM in its online-quantization (STE)
  mode, loaded from a float checkpoint of the same latent weights: in float32 under the float32 rule,
  and in float64 <= 1e-9 (transformers computes RMSNorm, the RoPE angles and its quantizers in float32
  whatever the model dtype; the float64 test runs those four in float64 with the same operations).
- Central finite differences on the smooth parts in float64.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pybitnet import native
from pybitnet.config import ModelConfig
from pybitnet.loaders.hf import hf_config_dict
from pybitnet.loaders.names import hf_to_internal, internal_to_hf
from pybitnet.model import Transformer
from pybitnet.train.loss import IGNORE_INDEX, chunked_cross_entropy
from pybitnet.train.qat import TrainableBitNet

from rules import assert_float32_rule, compare

EPS = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(act: str = "relu2", tie: bool = True) -> ModelConfig:
    # q width == hidden: transformers sizes attn_sub_norm by hidden_size
    return ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                       hidden_act=act, rope_theta=10000.0, rms_norm_eps=EPS, max_position_embeddings=128,
                       tie_word_embeddings=tie, bos_token_id=0, eos_token_ids=(1,))


def _model(config: ModelConfig, dtype: torch.dtype, seed: int = 3, **kw) -> TrainableBitNet:
    model = TrainableBitNet(config, dtype=dtype, seed=seed, vocab_chunk=40, **kw)
    with torch.no_grad():  # norms away from 1, so their gradients and values matter
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def _tokens(config: ModelConfig, batch: int = 2, seq: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def _our_grads(model: TrainableBitNet, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {}
    for name in model.latent_weights():
        param, rows = model.parameter_of(name)
        grads[name] = param.grad[rows].detach().clone()
    return loss.item(), grads


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("act", ["relu2", "silu"])
@pytest.mark.parametrize("tie", [True, False])
def test_exported_model_logits_equal_training_logits_float64(act, tie):
    config = _config(act, tie)
    model = _model(config, torch.float64)
    tokens = _tokens(config, batch=3, seq=24)
    with torch.no_grad():
        training = model.logits(tokens)
    inference = Transformer(*model.export(), dtype=torch.float64).forward_full(tokens)
    rel, agree = compare(inference, training)
    assert rel <= 1e-12 and agree == 1.0, f"max rel {rel:.2e}, argmax agreement {agree:.1%}"


def test_exported_model_logits_match_training_logits_float32():
    config = _config()
    model = _model(config, torch.float32)
    tokens = _tokens(config, batch=3, seq=24)
    with torch.no_grad():
        training = model.logits(tokens)
    assert_float32_rule(Transformer(*model.export(), dtype=torch.float32).forward_full(tokens), training)


def test_exported_weights_are_absmean_ternaries_of_the_latent_weights():
    config = _config()
    model = _model(config, torch.float64)
    latent = model.latent_weights()["layers.1.k_proj"]
    exported = model.export()[1]["layers.1.k_proj"]
    beta = latent.abs().mean().item()  # hand-written absmean (docs/exactness.md)
    assert exported.beta == pytest.approx(beta, rel=1e-15)
    assert torch.equal(exported.values, (latent / beta).round().clamp(-1, 1).to(torch.int8))


def test_float_model_has_no_ternary_export():
    with pytest.raises(Exception, match="float weights"):
        _model(_config(), torch.float64, float_weights=True).export()


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    config = _config()
    tokens = _tokens(config, seq=15, seed=2)
    plain = _our_grads(_model(config, torch.float64), tokens)
    recomputed = _our_grads(_model(config, torch.float64, checkpoint_layers=True), tokens)
    assert plain[0] == recomputed[0]
    for name, grad in plain[1].items():
        assert torch.equal(grad, recomputed[1][name]), name


@pytest.mark.skipif(native._compiler() is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_loss_gives_the_eager_loss_and_gradients():
    """TrainableBitNet(compile=True) runs the same graph through torch.compile: the same loss and
    gradients up to float32 reassociation of the fused elementwise chains."""
    config = _config()
    tokens = _tokens(config, seq=15, seed=4)
    eager = _our_grads(_model(config, torch.float32), tokens)
    compiled = _our_grads(_model(config, torch.float32, compile=True), tokens)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for name, grad in eager[1].items():
        assert (compiled[1][name] - grad).abs().max() <= 1e-3 * grad.abs().max() + 1e-9, name


def test_bf16_backward_gemms_give_nearly_the_float32_gradients():
    """backward_dtype=bfloat16 rounds grad_y and the GEMM outputs to bf16 (the ternary weights and
    int8 activations are exact there): the same loss, every gradient within ~1% and aligned."""
    config = _config()
    tokens = _tokens(config, batch=4, seq=31, seed=5)
    exact = _our_grads(_model(config, torch.float32), tokens)
    bf16 = _our_grads(_model(config, torch.float32, backward_dtype=torch.bfloat16), tokens)
    assert bf16[0] == exact[0]  # the forward is untouched
    for name, grad in exact[1].items():
        rel = float((bf16[1][name] - grad).abs().max() / grad.abs().max())
        cosine = float(F.cosine_similarity(bf16[1][name].flatten().double(), grad.flatten().double(), dim=0))
        assert rel <= 2e-2 and cosine >= 0.9999, f"{name}: rel {rel:.2e}, cosine {cosine:.6f}"
        assert not torch.equal(bf16[1][name], grad) or name.endswith("norm"), name  # bf16 did run


# ---------------------------------------------------------------------------------------------- reference
def _reference_loss(config: ModelConfig, w: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 forward in plain float64 autograd, written from the model definition; STE as
    transformers' online quantization defines it (gradient passes both roundings unchanged)."""
    d, hq, hkv = config.head_dim, config.num_heads, config.num_kv_heads

    def rms(x, weight):
        return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.rms_norm_eps))

    def act_quant(x):
        s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        return x + ((x * s).round().clamp(-128, 127) / s - x).detach()

    def weight_quant(weight):
        beta = weight.abs().mean().clamp(min=1e-5)
        return weight + ((weight / beta).round().clamp(-1, 1) * beta - weight).detach()

    def linear(x, name):
        return act_quant(x) @ weight_quant(w[name]).t()

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    bsz, seq = inputs.shape
    inv_freq = config.rope_theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # (T, D)

    def rope(x):  # (B, H, T, D), pairs (i, i + D/2)
        rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos + rotated * sin

    h = w["embed_tokens"][inputs]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(config.num_layers):
        p = f"layers.{i}."
        a = rms(h, w[p + "input_layernorm"])
        q = rope(linear(a, p + "q_proj").view(bsz, seq, hq, d).transpose(1, 2))
        k = rope(linear(a, p + "k_proj").view(bsz, seq, hkv, d).transpose(1, 2))
        v = linear(a, p + "v_proj").view(bsz, seq, hkv, d).transpose(1, 2)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, -math.inf)
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, hq * d)
        h = h + linear(rms(o, w[p + "attn_sub_norm"]), p + "o_proj")
        m = rms(h, w[p + "post_attention_layernorm"])
        gate, up = linear(m, p + "gate_proj"), linear(m, p + "up_proj")
        z = (torch.relu(gate) ** 2 if config.hidden_act == "relu2" else F.silu(gate)) * up
        h = h + linear(rms(z, w[p + "ffn_sub_norm"]), p + "down_proj")
    h = rms(h, w["norm"])
    logits = h @ w.get("lm_head", w["embed_tokens"]).t()
    return F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))


@pytest.mark.parametrize("act,tie", [("relu2", True), ("silu", False)])
def test_loss_and_gradients_match_float64_reference(act, tie):
    config = _config(act, tie)
    model = _model(config, torch.float64)
    tokens = _tokens(config, batch=2, seq=19, seed=4)
    loss, grads = _our_grads(model, tokens)
    leaves = {k: v.clone().requires_grad_(True) for k, v in model.latent_weights().items()}
    ref_loss = _reference_loss(config, leaves, tokens)
    ref_loss.backward()
    assert abs(loss - float(ref_loss)) <= 1e-9 * abs(float(ref_loss))
    for name, grad in grads.items():
        ref = leaves[name].grad
        rel = float((grad - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-9, f"gradient of {name}: max relative difference {rel:.2e}"
        assert float(ref.abs().max()) > 0, f"gradient of {name} is zero: the check would be empty"


# ---------------------------------------------------------------------------------------------- transformers
def _load_online_twin(model: TrainableBitNet, path, **load_options):
    """Write `model`'s latent weights as a float checkpoint in transformers' online-quantization mode and
    load it with transformers in the model's dtype (its torch.compile'd quantizers run eagerly)."""
    import transformers
    from transformers import AutoModelForCausalLM

    raw = hf_config_dict(model.config, "autobitlinear", str(model.dtype).removeprefix("torch."))
    raw["quantization_config"]["quantization_mode"] = "online"
    (path / "config.json").write_text(json.dumps(raw))
    save_file({internal_to_hf(k): v.contiguous() for k, v in model.latent_weights().items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    dtype_option = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch._dynamo.config.patch(disable=True):
        return AutoModelForCausalLM.from_pretrained(path, **{dtype_option: model.dtype}, **load_options)


def _assert_gradients_match(grads: dict[str, torch.Tensor], hf, max_rel: float, min_cosine: float | None = None) -> None:
    """Our gradients against the transformers model's, parameter by parameter (names mapped to ours):
    max |difference| / max |transformers| <= max_rel, and the cosine similarity >= min_cosine if given."""
    hf_grads = {hf_to_internal(n): p.grad for n, p in hf.named_parameters()}
    assert set(hf_grads) == set(grads)
    for name, grad in grads.items():
        ref = hf_grads[name]
        rel = float((grad - ref).abs().max() / ref.abs().max())
        assert rel <= max_rel, f"gradient of {name}: max |d| / max|transformers| = {rel:.2e}"
        if min_cosine is not None:
            cosine = float(F.cosine_similarity(grad.flatten().double(), ref.flatten().double(), dim=0))
            assert cosine >= min_cosine, f"gradient of {name}: cosine similarity {cosine:.5f}"


@pytest.fixture(scope="module")
def transformers_twin(tmp_path_factory):
    """(our float32 model, transformers' online-quantization BitNet loaded from its latent weights)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    config = _config()
    model = _model(config, torch.float32, seed=11)
    hf, info = _load_online_twin(model, tmp_path_factory.mktemp("online"), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"transformers did not load the latent weights cleanly: {problems}"
    assert any(type(m).__name__ == "AutoBitLinear" and m.online_quant for m in hf.modules())
    return config, model, hf.train()


def test_loss_and_gradients_match_transformers_online_quantization(transformers_twin):
    config, model, hf = transformers_twin
    tokens = _tokens(config, batch=2, seq=31, seed=6)
    loss, grads = _our_grads(model, tokens)
    hf.zero_grad(set_to_none=True)
    with torch._dynamo.config.patch(disable=True):
        hf_loss = hf(input_ids=tokens, labels=tokens).loss
        hf_loss.backward()
    assert abs(loss - float(hf_loss)) <= 5e-2 * abs(float(hf_loss))
    assert abs(loss - float(hf_loss)) <= 1e-3 * abs(float(hf_loss))  # measured: the same float32 loss
    _assert_gradients_match(grads, hf, max_rel=5e-2, min_cosine=0.999)


class _Float64Quantizer(torch.autograd.Function):
    """transformers' WeightQuant / ActQuant (integrations/bitnet.py), the same operations in the input's dtype."""

    @staticmethod
    def forward(ctx, x, per_row):
        if per_row:  # ActQuant: absmax per token to int8
            scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
            return (x * scale).round().clamp(-128, 127) / scale
        scale = 1.0 / x.abs().mean().clamp(min=1e-5)  # WeightQuant: absmean to ternary
        return (x * scale).round().clamp(-1, 1) / scale

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(), None


@contextlib.contextmanager
def _transformers_in_float64(hf, config):
    """transformers' BitNet runs RMSNorm, the RoPE angles and both STE quantizers in float32 whatever the
    model dtype. Within this context those four run the same operations in float64 (and the caller takes
    the loss from the float64 logits); everything else is transformers' own code."""
    from unittest import mock

    from transformers.integrations import bitnet as hf_bitnet
    from transformers.models.bitnet import modeling_bitnet as hf_model

    def rms_norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(device=x.device, dtype=torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    weight_quant = type("WeightQuant", (), {"apply": staticmethod(lambda w: _Float64Quantizer.apply(w, False))})
    act_quant = type("ActQuant", (), {"apply": staticmethod(lambda a: _Float64Quantizer.apply(a, True))})
    d = config.head_dim
    for module in hf.modules():  # built in float32 at load
        if isinstance(module, hf_model.BitNetRotaryEmbedding):
            module.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    with mock.patch.object(hf_model.BitNetRMSNorm, "forward", rms_norm), \
            mock.patch.object(hf_model.BitNetRotaryEmbedding, "forward", rotary), \
            mock.patch.object(hf_bitnet, "WeightQuant", weight_quant), mock.patch.object(hf_bitnet, "ActQuant", act_quant):
        yield


@pytest.mark.parametrize("act,tie", [("relu2", True), ("silu", False)])
def test_loss_and_gradients_match_transformers_in_float64(tmp_path, act, tie):
    """Loss and every gradient against transformers' online-quantization BitNet in float64: <= 1e-9."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    config = _config(act, tie)
    model = _model(config, torch.float64, seed=11)
    hf = _load_online_twin(model, tmp_path, attn_implementation="sdpa").train()
    assert {p.dtype for p in hf.parameters()} == {torch.float64}
    tokens = _tokens(config, batch=2, seq=31, seed=6)
    loss, grads = _our_grads(model, tokens)
    with _transformers_in_float64(hf, config):
        logits = hf(input_ids=tokens[:, :-1]).logits  # (B, T, V) float64
        hf_loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1))
        hf_loss.backward()
    assert abs(loss - float(hf_loss)) <= 1e-9 * abs(float(hf_loss))
    _assert_gradients_match(grads, hf, max_rel=1e-9)


# ---------------------------------------------------------------------------------------------- finite differences
def _directional_check(model: TrainableBitNet, tokens: torch.Tensor, names: list[str], seed: int = 0) -> None:
    _, grads = _our_grads(model, tokens)
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        param, rows = model.parameter_of(name)
        direction = torch.randn(param[rows].shape, generator=gen, dtype=torch.float64)
        step = 1e-6
        with torch.no_grad():
            param[rows] += step * direction
            up = float(model.loss(tokens[:, :-1], tokens[:, 1:]))
            param[rows] -= 2 * step * direction
            down = float(model.loss(tokens[:, :-1], tokens[:, 1:]))
            param[rows] += step * direction
        numeric = (up - down) / (2 * step)
        analytic = float((grads[name] * direction).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), f"{name}: fd {numeric} vs grad {analytic}"


def test_finite_differences_float_weights_model():
    """Without quantization every part is smooth: norms, attention (through q/k/v/o), FFN, embeddings."""
    config = _config()
    model = _model(config, torch.float64, float_weights=True)
    names = ["embed_tokens", "norm", "layers.0.input_layernorm", "layers.0.attn_sub_norm", "layers.1.q_proj",
             "layers.1.k_proj", "layers.0.v_proj", "layers.1.o_proj", "layers.0.post_attention_layernorm",
             "layers.1.ffn_sub_norm", "layers.0.gate_proj", "layers.1.down_proj"]
    _directional_check(model, _tokens(config, seq=13, seed=8), names)


def test_finite_differences_after_the_last_quantizer():
    """In the quantized model the final norm and an untied head are smooth: their gradients are exact."""
    config = _config(tie=False)
    _directional_check(_model(config, torch.float64), _tokens(config, seq=13, seed=9), ["norm", "lm_head"])


# ---------------------------------------------------------------------------------------------- chunked loss
def test_chunked_cross_entropy_matches_full_and_gradchecks():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(23, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 23, (11,), generator=gen)
    targets[3] = IGNORE_INDEX
    full = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    for chunk in (5, 64):
        chunked = chunked_cross_entropy(hidden, weight, targets, chunk=chunk)
        assert abs(float(full) - float(chunked)) <= 1e-12 * float(full)
    for chunk in (5, 64):  # several chunks (5 does not divide 23), and one chunk that keeps its logits
        assert torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy(h, w, targets, chunk), (hidden, weight))


def test_training_forward_rejects_bad_tokens():
    model = _model(_config(), torch.float32)
    with pytest.raises(Exception, match="out of range"):
        model.loss(torch.tensor([[1, 500]]), torch.tensor([[1, 2]]))
    with pytest.raises(Exception, match="non-empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
