"""Quantization-aware training of BitNet b1.58: latent float weights, the inference math in the forward.

Every BitLinear keeps a latent float weight (training only). Each forward ternarizes it with absmean
(β = max(mean|W|, 1e-5), T = clamp(round(W · 1/β), -1, 1)) and quantizes its input to int8 with
absmax, then computes y = (q · Tᵀ) · (β / s_x) exactly as the inference BitLinear does: the same
integer accumulators, scaled in the same float steps. So an exported model's inference logits are the
training forward's logits (bit for bit in float64).

Gradients are straight-through estimators (as transformers' online-quantization BitNet defines them):
the backward pass sees y = x̂ · Ŵᵀ with x̂ = q / s_x and Ŵ = T · β, and both roundings pass the
gradient through unchanged (∂x̂/∂x = I, ∂Ŵ/∂W = I).

The FFN's quantized input in inference is computed from the integer gate/up accumulators
(quant.activations.quantize_normed); training takes those exact integers for the forward value and
lets the gradient flow through the float path sub_norm(relu(g)² · u) that they stand for.

`float_weights=True` turns both quantizers off: the same architecture in full precision, the
baseline that measures what 1.58 bits cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from ..config import ModelConfig
from ..errors import InputError
from ..layers import RMSNorm, RotaryTables, _sdpa, apply_rope
from ..quant.activations import quantize_activations, quantize_normed
from ..quant.ternary import absmean
from ..weights import TernaryWeight, Weights, check_weights
from .loss import chunked_cross_entropy

INIT_STD = 0.02


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent W (N, K) -> (T (N, K) in W's dtype, values in {-1, 0, 1}; β 0-dim tensor in W's dtype): the
    loader's absmean (quant.ternary.absmean, summed in float64 whatever the thread count)."""
    beta = absmean(weight).to(weight.dtype)
    values = (weight.detach() * (1.0 / beta)).round_().clamp_(-1, 1)
    return values, beta


def int8_accumulation(x: torch.Tensor) -> bool:
    """float32 on CPU accumulates with the int8 GEMM; float64 (exactness checks) stays in float64."""
    return x.dtype == torch.float32 and x.device.type == "cpu"


class _TernaryLinearSTE(torch.autograd.Function):
    """y = acc · (1/s_x · β_j) with acc = q · Tᵀ, parts j of a fused weight each with their own β.

    Inputs: x (M, K) the float input, weight (N, K) latent, part_bounds, and optionally (q, act_scale)
    already computed from x by an exact route (the FFN's down projection); else x is quantized here;
    backward_dtype: the dtype of the two backward GEMMs (None: x's dtype).
    Outputs: y (M, N), and the non-differentiable acc (M, N) (int32 from the int8 GEMM, else x's dtype),
    act_scale (M, 1), betas (N,) per column.
    """

    @staticmethod
    def forward(ctx, x, weight, part_bounds, q=None, act_scale=None, backward_dtype=None):
        parts = [ternarize(weight[a:b]) for a, b in part_bounds]
        values = torch.cat([t for t, _ in parts]) if len(parts) > 1 else parts[0][0]  # (N, K)
        betas = torch.cat([beta.expand(b - a) for (a, b), (_, beta) in zip(part_bounds, parts)])  # (N,)
        if q is None:
            q, act_scale = quantize_activations(x, as_int8=int8_accumulation(x))
        if q.dtype == torch.int8:  # int8 GEMM, int32 accumulators: the same integers, about twice as fast
            values = values.to(torch.int8)
            acc = kernels.accumulate(q, values, "int8")  # (M, N) int32
        else:
            acc = q @ values.t()  # (M, N): integers, exact in float32 below 2**24
        inv_scale = act_scale.reciprocal()  # (M, 1)
        y = torch.empty(acc.shape, dtype=x.dtype, device=x.device)  # (M, N)
        for (a, b), (_, beta) in zip(part_bounds, parts):  # the inference BitLinear's acc_j * (1/s_x * β_j)
            torch.mul(acc[:, a:b], inv_scale * beta, out=y[:, a:b])
        ctx.save_for_backward(q, act_scale, values, betas)
        ctx.backward_dtype = backward_dtype
        ctx.mark_non_differentiable(acc, act_scale, betas)
        return y, acc, act_scale, betas

    @staticmethod
    def backward(ctx, grad_y, _acc, _scale, _betas):
        q, act_scale, values, betas = ctx.saved_tensors
        grad_x = grad_w = None
        gemm = ctx.backward_dtype if ctx.backward_dtype is not None else grad_y.dtype
        # ternary T and int8 q are exact in bf16: only grad_y (and the products' sums) are rounded
        if ctx.needs_input_grad[0]:  # ∂/∂x of x̂ Ŵᵀ with ∂x̂/∂x = I: (grad_y · β) Tᵀᵀ
            grad_x = ((grad_y * betas).to(gemm) @ values.to(gemm)).to(grad_y.dtype)
        if ctx.needs_input_grad[1]:  # ∂/∂W with ∂Ŵ/∂W = I: (grad_y / s_x)ᵀ q
            grad_w = ((grad_y / act_scale).to(gemm).t() @ q.to(gemm)).to(grad_y.dtype)
        return grad_x, grad_w, None, None, None, None


class TrainableRMSNorm(RMSNorm):
    """The inference RMSNorm (same forward) with a trainable weight."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps


class LatentLinear(nn.Module):
    """A (fused) BitLinear in training: one latent weight (sum(out_features), in_features)."""

    def __init__(self, out_features: list[int], in_features: int, dtype: torch.dtype, float_weights: bool,
                 backward_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features, self.float_weights = list(out_features), in_features, float_weights
        self.backward_dtype = backward_dtype
        self.weight = nn.Parameter(torch.empty(sum(out_features), in_features, dtype=dtype))  # (N, K)
        ends = [sum(out_features[: j + 1]) for j in range(len(out_features))]
        self.part_bounds = tuple((end - n, end) for end, n in zip(ends, out_features))

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None, act_scale: torch.Tensor | None = None):
        """x (M, K) -> (y (M, N), acc, act_scale, betas); the last three are None without quantization."""
        if self.float_weights:
            return x @ self.weight.t(), None, None, None
        return _TernaryLinearSTE.apply(x, self.weight, self.part_bounds, q, act_scale, self.backward_dtype)

    def export(self) -> list[TernaryWeight]:
        out = []
        for a, b in self.part_bounds:
            values, beta = ternarize(self.weight[a:b])
            out.append(TernaryWeight(values.to(torch.int8).contiguous(), float(beta)))
        return out


class TrainingBlock(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, float_weights: bool,
                 backward_dtype: torch.dtype | None = None):
        super().__init__()
        c, eps = config, config.rms_norm_eps
        self.config = c
        self.input_norm = TrainableRMSNorm(c.hidden_size, eps, dtype)
        self.qkv = LatentLinear([c.q_size, c.kv_size, c.kv_size], c.hidden_size, dtype, float_weights, backward_dtype)
        self.attn_sub_norm = TrainableRMSNorm(c.q_size, eps, dtype) if c.sub_norms else None
        self.o_proj = LatentLinear([c.hidden_size], c.q_size, dtype, float_weights, backward_dtype)
        self.post_attention_norm = TrainableRMSNorm(c.hidden_size, eps, dtype)
        self.gate_up = LatentLinear([c.intermediate_size, c.intermediate_size], c.hidden_size, dtype, float_weights, backward_dtype)
        self.ffn_sub_norm = TrainableRMSNorm(c.intermediate_size, eps, dtype) if c.sub_norms else None
        self.down = LatentLinear([c.hidden_size], c.intermediate_size, dtype, float_weights, backward_dtype)
        self.scale = 1.0 / math.sqrt(c.head_dim)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h (B, T, H) residual stream -> (B, T, H)."""
        bsz, seq, width = h.shape
        c = self.config
        y = self.qkv(self.input_norm(h).reshape(-1, width))[0]  # (M, q + 2 kv)
        q, k, v = y.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = apply_rope(q.reshape(bsz, seq, c.num_heads, c.head_dim), cos, sin).transpose(1, 2)  # (B, Hq, T, D)
        k = apply_rope(k.reshape(bsz, seq, c.num_kv_heads, c.head_dim), cos, sin).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.reshape(bsz, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        out = _sdpa(q, k, v, causal=seq > 1, scale=self.scale)
        out = out.transpose(1, 2).reshape(bsz * seq, c.q_size)  # (M, Hq*D)
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        h = h + self.o_proj(out)[0].reshape(bsz, seq, width)
        return h + self._ffn(self.post_attention_norm(h).reshape(-1, width)).reshape(bsz, seq, width)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        """Normed x (M, H) -> down(sub_norm(act(gate) · up)) (M, H)."""
        f = self.config.intermediate_size
        y, acc, act_scale, betas = self.gate_up(x)
        gate, up = y.split([f, f], dim=-1)  # split, not slicing: its backward is one cat, not zeros + copies
        z_float = (F.relu(gate).square() if self.config.hidden_act == "relu2" else F.silu(gate)) * up  # (M, F)
        normed = self.ffn_sub_norm(z_float) if self.ffn_sub_norm is not None else z_float
        if acc is None:  # float weights: nothing to quantize
            return self.down(normed)[0]
        # The inference FFN's exact route (layers.FeedForward._activate): z from the integer
        # accumulators, the per-row factor handed to the down projection's norm + quantization.
        inv = act_scale.reciprocal()  # (M, 1)
        beta_gate, beta_up = betas[0], betas[f]
        up_acc = acc[:, f:].to(x.dtype)
        if self.config.hidden_act == "relu2":
            z = acc[:, :f].to(x.dtype).clamp_(min=0).square_().mul_(up_acc)
            row_scale = (inv * beta_gate).square_() * (inv * beta_up)
        else:
            z = F.silu(acc[:, :f] * (inv * beta_gate)).mul_(up_acc)
            row_scale = inv * beta_up
        sub = self.ffn_sub_norm
        q, down_scale = quantize_normed(z, row_scale, sub.weight.detach() if sub is not None else None,
                                        sub.eps if sub is not None else 0.0, as_int8=int8_accumulation(z))
        return self.down(normed, q, down_scale)[0]


class TrainableBitNet(nn.Module):
    """A BitNet b1.58 model in training form. forward(tokens) -> final-normed hidden (B, T, H);
    loss(tokens, targets) -> mean next-token cross-entropy; export() -> (config, inference Weights)."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32, float_weights: bool = False,
                 checkpoint_layers: bool = False, seed: int = 0, vocab_chunk: int = 8192,
                 backward_dtype: torch.dtype | None = None, compile: bool = False):
        """backward_dtype: the dtype of the projections' backward GEMMs. None (default) = the model dtype;
        torch.bfloat16 runs them as bf16 GEMMs (AVX-512 BF16), which round grad_y and the gradients to
        bf16 (the ternary weights and int8 activations they multiply are exact in bf16): about twice
        the GEMM rate for ~0.4% relative noise on each gradient element, mixed-precision training's trade.
        compile: torch.compile the loss (forward and backward graphs; elementwise chains fused), for long runs."""
        super().__init__()
        self.config, self.dtype, self.float_weights = config, dtype, float_weights
        self.checkpoint_layers, self.vocab_chunk = checkpoint_layers, vocab_chunk
        self.embed_tokens = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype))  # (V, H)
        self.layers = nn.ModuleList(TrainingBlock(config, dtype, float_weights, backward_dtype)
                                    for _ in range(config.num_layers))
        self.norm = TrainableRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_word_embeddings else nn.Parameter(torch.empty_like(self.embed_tokens))
        self.rope = RotaryTables(config.head_dim, config.rope_theta, dtype, torch.device("cpu"),
                                 min(config.max_position_embeddings, 8192))
        self.reset_parameters(seed)
        self._loss = torch.compile(self._eager_loss, dynamic=False) if compile else self._eager_loss

    def reset_parameters(self, seed: int) -> None:
        """Normal(0, 0.02) projections and embeddings, norms at 1, from one seeded generator."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * INIT_STD)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> final-normed hidden (B, T, H)."""
        self._check_tokens(tokens)
        return self._hidden(tokens)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise InputError(f"tokens must be a non-empty (batch, seq) tensor, got shape {tuple(tokens.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise InputError(f"token id out of range [0, {self.config.vocab_size})")

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens, self.embed_tokens)  # (B, T, H)
        cos, sin = self.rope.span(0, tokens.shape[1])  # (T, D)
        cos, sin = cos[None, :, None, :].to(h.device), sin[None, :, None, :].to(h.device)
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.norm(h)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V): for tests and small vocabularies; training uses loss()."""
        return self(tokens) @ self.head_weight.t()

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of targets (B, T) (-100 = ignored) given tokens (B, T), vocab chunk by chunk."""
        self._check_tokens(tokens)
        return self._loss(tokens, targets)

    def _eager_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(tokens)
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.head_weight, targets.reshape(-1),
                                     self.vocab_chunk)

    def latent_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter under its internal weight name, projections unfused as float (out, in)
        master weights (the layout of a float checkpoint such as 2B-4T-bf16)."""
        w = {"embed_tokens": self.embed_tokens.detach(), "norm": self.norm.weight.detach()}
        if self.lm_head is not None:
            w["lm_head"] = self.lm_head.detach()
        for i, block in enumerate(self.layers):
            p = f"layers.{i}."
            w[p + "input_layernorm"] = block.input_norm.weight.detach()
            w[p + "post_attention_layernorm"] = block.post_attention_norm.weight.detach()
            if block.attn_sub_norm is not None:
                w[p + "attn_sub_norm"] = block.attn_sub_norm.weight.detach()
                w[p + "ffn_sub_norm"] = block.ffn_sub_norm.weight.detach()
            fused = ((block.qkv, ("q_proj", "k_proj", "v_proj")), (block.o_proj, ("o_proj",)),
                     (block.gate_up, ("gate_proj", "up_proj")), (block.down, ("down_proj",)))
            for linear, names in fused:
                for name, (a, b) in zip(names, linear.part_bounds):
                    w[p + name] = linear.weight.detach()[a:b]
        return w

    def parameter_of(self, name: str) -> tuple[torch.Tensor, slice]:
        """(parameter, row slice) holding the internal weight `name` (fused projections share one)."""
        if name in ("embed_tokens", "norm", "lm_head"):
            param = {"embed_tokens": self.embed_tokens, "norm": self.norm.weight, "lm_head": self.lm_head}[name]
            return param, slice(None)
        _, index, kind = name.split(".")
        block = self.layers[int(index)]
        norms = {"input_layernorm": block.input_norm, "post_attention_layernorm": block.post_attention_norm,
                 "attn_sub_norm": block.attn_sub_norm, "ffn_sub_norm": block.ffn_sub_norm}
        if kind in norms:
            return norms[kind].weight, slice(None)
        linear, part = {"q_proj": (block.qkv, 0), "k_proj": (block.qkv, 1), "v_proj": (block.qkv, 2),
                        "o_proj": (block.o_proj, 0), "gate_proj": (block.gate_up, 0), "up_proj": (block.gate_up, 1),
                        "down_proj": (block.down, 0)}[kind]
        return linear.weight, slice(*linear.part_bounds[part])

    def export(self, storage_dtype: torch.dtype | None = None) -> tuple[ModelConfig, Weights]:
        """The inference weight set: int8 ternaries + β per projection, float norms and embeddings.

        `storage_dtype` (e.g. float16) rounds every float tensor and β to values that dtype holds, so
        HF packed (fp32 scales), GGUF I2_S (fp32) and GGUF TQ2_0 (fp16 scales) files all store the
        same numbers and give identical logits; None keeps the training values (then inference
        logits equal the training forward's)."""
        if self.float_weights:
            raise InputError("a model trained with float weights has no ternary form to export")
        w: Weights = {"embed_tokens": self.embed_tokens.detach().clone(), "norm": self.norm.weight.detach().clone()}
        if self.lm_head is not None:
            w["lm_head"] = self.lm_head.detach().clone()
        for i, block in enumerate(self.layers):
            p = f"layers.{i}."
            w[p + "input_layernorm"] = block.input_norm.weight.detach().clone()
            w[p + "post_attention_layernorm"] = block.post_attention_norm.weight.detach().clone()
            if block.attn_sub_norm is not None:
                w[p + "attn_sub_norm"] = block.attn_sub_norm.weight.detach().clone()
                w[p + "ffn_sub_norm"] = block.ffn_sub_norm.weight.detach().clone()
            (w[p + "q_proj"], w[p + "k_proj"], w[p + "v_proj"]), (w[p + "o_proj"],) = block.qkv.export(), block.o_proj.export()
            (w[p + "gate_proj"], w[p + "up_proj"]), (w[p + "down_proj"],) = block.gate_up.export(), block.down.export()
        if storage_dtype is not None:
            w = {name: TernaryWeight(v.values, float(torch.tensor(v.beta).to(storage_dtype)))
                 if isinstance(v, TernaryWeight) else v.to(storage_dtype).to(v.dtype) for name, v in w.items()}
        check_weights(self.config, w, source="export")
        return self.config, w
