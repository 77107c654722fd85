"""Building blocks: BitLinear (fused ternary projections), RMSNorm, RoPE tables, attention, FFN."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, native
from .cache import LayerWindow
from .quant.activations import quantize_activations, quantize_normed
from .quant.packed import release_free_heap
from .weights import TernaryWeight


class BitLinear(nn.Module):
    """One or more ternary projections that share one input (fused QKV, fused gate/up).

    y_j = (q · T_jᵀ) · β_j / s_x for each part j, with q, s_x the per-row int8 quantization of x
    (docs/exactness.md). The parts are one GEMM over the concatenated weights, so the input is
    quantized once and read once.
    """

    def __init__(self, parts: list[TernaryWeight], backend: str = kernels.AUTO):
        super().__init__()
        self.in_features = parts[0].shape[1]
        if any(p.shape[1] != self.in_features for p in parts):
            raise ValueError(f"fused parts differ in input width: {[p.shape for p in parts]}")
        # Packed parts concatenate row-wise as they are: the layout is per output row.
        if kernels.weight_storage(parts[0].device) == "packed":
            stored = [p.packed for p in parts]
            # The loader's copies of the layers built so far were freed as they were fused; hand
            # their pages back before this layer allocates, so a model build never holds two copies.
            release_free_heap()
        else:
            stored = [p.values.to(torch.int8) for p in parts]
        weights = torch.cat(stored) if len(stored) > 1 else stored[0].contiguous()
        # (N, ceil(K/256) * 64) uint8 packed 2-bit codes on CPU, (N, K) int8 elsewhere: the only copy
        self.register_buffer("ternary_weights", weights)
        self.out_features = [p.shape[0] for p in parts]
        ends = [sum(self.out_features[: j + 1]) for j in range(len(parts))]
        self.bounds = tuple((end - n, end) for end, n in zip(ends, self.out_features))  # each part's columns
        self.betas = [float(p.beta) for p in parts]
        # (N,) float32 on CPU: β of each output column, the per-column scale of the native path (CPU only)
        self.col_scale = torch.cat([torch.full((n,), b, dtype=torch.float32) for n, b in zip(self.out_features, self.betas)])
        self.backend = kernels.check_backend(backend)

    def choose_backend(self, rows: int, dtype: torch.dtype, device: torch.device) -> str:
        return kernels.select_backend(self.backend, rows, dtype, device, self.in_features, self.ternary_weights.shape[0])

    def fused_ops(self, x: torch.Tensor, backend: str):
        """The native ops when they run this call, else None.

        Float32 rows on CPU with packed weights quantize in native code (kernels.cpp: quantize_rows)
        for every backend but `reference`, and up to NATIVE_MAX_ROWS rows run the whole BitLinear there
        (ternary_linear): the full path (unpack + `_int_mm`) and the step path then quantize and scale
        with the same code and agree bit for bit. Without the native library, all of it is torch."""
        if backend == "reference" or x.device.type != "cpu" or self.ternary_weights.dtype != torch.uint8 \
                or x.dtype not in (torch.float32, torch.int32):
            return None
        return native.ops()

    def quantize(self, x: torch.Tensor, norm: "RMSNorm | None", row_scale: torch.Tensor | None,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, K) -> (q (M, K), act_scale (M, 1)) of RMSNorm(row_scale * x) (norm/row_scale optional),
        q as int8 for the int8 and native backends, else integer values in x's dtype."""
        as_int8 = kernels.quantizes_to_int8(backend)
        if row_scale is None:
            # The reference op order (HF RMSNorm, then x * 127/absmax): at an exact rounding tie, which
            # bf16 embeddings and norm weights can produce in layer 0, the result then depends on the
            # same float steps as in transformers and in a reference written from docs/exactness.md.
            return quantize_activations(norm(x) if norm is not None else x, as_int8=as_int8)
        weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        return quantize_normed(x, row_scale, weight, eps, as_int8=as_int8)

    def accumulate(self, x: torch.Tensor, norm: "RMSNorm | None" = None, row_scale: torch.Tensor | None = None,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, K) -> (accumulators (M, N) integer-valued, act_scale (M, 1)).

        The input quantized is RMSNorm(row_scale * x) when `norm` is given (every BitLinear input of
        BitNet is a norm's output), else row_scale * x; see quant.activations.quantize_normed.
        x may also be int32 gate|up accumulators (M, 2K) of a relu² FFN: the input is then
        relu(gate)² · up (FeedForward hands them over unformed when the native ops take them).
        """
        return self._run(x, norm, row_scale, backend, scaled=False)

    def project(self, x: torch.Tensor, norm: "RMSNorm | None" = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> every part side by side (..., N) in x's dtype (float32 for int32 gate|up input)."""
        lead, dtype = x.shape[:-1], torch.float32 if x.dtype == torch.int32 else x.dtype
        y, act_scale = self._run(x.reshape(-1, x.shape[-1]), norm, row_scale, None, scaled=True)
        if act_scale is not None:  # y holds the accumulators still
            y = self._scale(y, act_scale, dtype)
        return y.reshape(*lead, y.shape[-1])

    def forward(self, x: torch.Tensor, norm: "RMSNorm | None" = None, row_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x (..., K) -> one (..., N_j) tensor per part (views into one result)."""
        y = self.project(x, norm, row_scale)
        return [y] if len(self.out_features) == 1 else [y[..., a:b] for a, b in self.bounds]

    def _run(self, x: torch.Tensor, norm: "RMSNorm | None", row_scale: torch.Tensor | None, backend: str | None,
             scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(accumulators, act_scale), or with `scaled` where the native ops ran: (y (M, N) float32, None)."""
        dtype = torch.float32 if x.dtype == torch.int32 else x.dtype
        chosen = backend or self.choose_backend(x.shape[0], dtype, x.device)
        ops = self.fused_ops(x, chosen)
        if ops is None:
            if x.dtype == torch.int32:
                x = relu2_product(x)
            q, act_scale = self.quantize(x, norm, row_scale, chosen)
            return kernels.accumulate(q, self.ternary_weights, chosen), act_scale
        weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        rows = row_scale.reshape(-1) if row_scale is not None else None
        if chosen == "native":
            out, act_scale = ops.ternary_linear(x, weight, rows, eps, self.ternary_weights,
                                                self.col_scale if scaled else None, native.isa())
            return (out, None) if scaled else (out, act_scale)
        q, act_scale = ops.quantize_rows(x, weight, rows, eps, native.isa())
        acc = kernels.accumulate(q, self.ternary_weights, chosen)
        if scaled:  # ternary_linear's scaling, in the same float32 operations
            return acc * (act_scale.reciprocal() * self.col_scale), None
        return acc, act_scale

    def _scale(self, acc: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Accumulators (M, N) -> y (M, N) in `dtype`, y_j = acc_j * (1/s_x * β_j) for each part j."""
        inv_scale = act_scale.reciprocal()  # (M, 1); acc / s_x * β == acc * (β / s_x)
        y = torch.empty(acc.shape, dtype=dtype, device=acc.device)
        for (a, b), beta in zip(self.bounds, self.betas):
            torch.mul(acc[:, a:b], inv_scale * beta, out=y[:, a:b])
        return y

    def part(self, index: int) -> TernaryWeight:
        start, end = self.bounds[index]
        rows = self.ternary_weights[start:end]
        if rows.dtype == torch.uint8:
            return TernaryWeight(packed=rows, in_features=self.in_features, beta=self.betas[index])
        return TernaryWeight(rows, self.betas[index])


def relu2_product(gate_up: torch.Tensor) -> torch.Tensor:
    """int32 gate|up accumulators (M, 2F) -> relu(gate)² · up (M, F) float32, in the float32
    operations of the native quantize_rows (so both paths quantize the same values)."""
    half = gate_up.shape[1] // 2
    return gate_up[:, :half].float().clamp_(min=0).square_().mul_(gate_up[:, half:].float())


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * (x * 1/sqrt(mean(x²) + eps)), docs/exactness.md step by step.

        mean as sum / K and 1/sqrt rather than torch's mean (sum * (1/K)) and rsqrt: for bf16-valued
        rows (layer 0 of a bf16 checkpoint) the float64 sum of squares is exact in any order, so this
        gives the same bits as a plain reference, and an exact int8 rounding tie downstream resolves
        the same way in both."""
        mean_sq = x.square().sum(-1, keepdim=True) / x.shape[-1]
        return self.weight * (x * torch.sqrt(mean_sq + self.eps).reciprocal())


class RotaryTables:
    """NeoX-style RoPE (pairs i, i + D/2) cos/sin tables, grown on demand (docs/exactness.md)."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device, length: int):
        self.head_dim, self.theta, self.dtype, self.device = head_dim, theta, dtype, device
        self._lock = threading.Lock()  # tables grow on demand; callers on several threads share them
        self._pair = self._build(length)  # (cos, sin), each (L, D); replaced whole, never mutated

    def _tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin holding at least `length` positions: one consistent pair, grown under the lock."""
        pair = self._pair
        if length <= pair[0].shape[0]:
            return pair
        with self._lock:
            if length > self._pair[0].shape[0]:
                self._pair = self._build(max(length, 2 * self._pair[0].shape[0]))
            return self._pair

    def _build(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # angles in float64, then rounded once to the model dtype
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (L, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, D)
        return angles.cos().to(self.dtype).to(self.device), angles.sin().to(self.dtype).to(self.device)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (...) long -> cos, sin (..., D)."""
        cos, sin = self._tables(int(positions.max()) + 1 if positions.numel() else 0)
        return cos[positions], sin[positions]

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (length, D) for positions start .. start+length-1."""
        cos, sin = self._tables(start + length)
        return cos[start : start + length], sin[start : start + length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin broadcastable to (B, T, 1, D): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class AttentionMask:
    """Which keys the queries of one forward call see.

    own_block: no earlier position exists (a sequence from position 0), so the queries see their own
               block's K/V causally: the fast causal SDPA path, whether or not a cache keeps them.
    otherwise: the cache window's positions [0, length), filtered by `allowed` (None: all of them).
    """

    own_block: bool
    allowed: torch.Tensor | None = None  # bool, broadcastable to (B, Hq, T, S); True = may attend
    positions: torch.Tensor | None = None  # (B,) int64 for one query per row: its position (sees [0, position])
    starts: torch.Tensor | None = None  # (B,) int64: each row's first position in this call (None: all 0)


def _sdpa(q, k, v, *, mask=None, causal=False, scale=None):
    """q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D); GQA without repeating K/V in memory."""
    if _HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _probe_gqa() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


_HAS_GQA = _probe_gqa()


class Attention(nn.Module):
    def __init__(self, input_norm: RMSNorm, qkv: BitLinear, o_proj: BitLinear, sub_norm: RMSNorm | None,
                 num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.input_norm, self.qkv, self.o_proj, self.sub_norm = input_norm, qkv, o_proj, sub_norm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerWindow | None,
                mask: AttentionMask) -> torch.Tensor:
        """x (B, T, H) -> o_proj(attention) (B, T, H); the block's K/V go to `kv` when a cache is kept."""
        bsz, seq, _ = x.shape
        qkv = self.qkv.project(x, norm=self.input_norm)  # (B, T, (Hq + 2 Hkv) * D)
        ops = self._decode_ops(qkv, kv, mask)
        if ops is not None:  # one token per row: RoPE, the cache write and attention in one native call
            d = self.head_dim
            out = ops.attention_decode(qkv.view(bsz, -1), cos.reshape(-1, d), sin.reshape(-1, d), kv.keys, kv.values,
                                       mask.positions, self.num_heads, self.num_kv_heads, self.scale, native.isa())
            return self.o_proj(out.view(bsz, 1, -1), norm=self.sub_norm)[0]  # out (B, Hq*D)
        ops = self._prefill_ops(qkv, kv)
        if ops is not None:  # several tokens per row: each query attends as a decode step at its position would
            d = self.head_dim
            if kv is None:  # a whole sequence kept nowhere: its K/V in a scratch cache of its own
                keys = qkv.new_empty(bsz, self.num_kv_heads, seq, d)  # (B, Hkv, T, D)
                values = torch.empty_like(keys)
            else:
                keys, values = kv.keys, kv.values  # (B, Hkv, L, D)
            starts = mask.starts if mask.starts is not None else torch.zeros(bsz, dtype=torch.long)  # (B,)
            out = ops.attention_prefill(qkv, cos.reshape(-1, d), sin.reshape(-1, d), keys, values, starts,
                                        self.num_heads, self.num_kv_heads, self.scale, native.isa())  # (B, T, Hq*D)
            return self.o_proj(out, norm=self.sub_norm)[0]
        q, k, v = (qkv[..., a:b] for a, b in self.qkv.bounds)
        q = apply_rope(q.view(bsz, seq, self.num_heads, self.head_dim), cos, sin).transpose(1, 2)  # (B, Hq, T, D)
        k = apply_rope(k.view(bsz, seq, self.num_kv_heads, self.head_dim), cos, sin).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if kv is not None:
            kv.write(k, v)
        if mask.own_block:
            out = _sdpa(q, k, v, causal=seq > 1, scale=self.scale)
        else:
            keys, values = kv.visible()  # (B, Hkv, S, D)
            out = _sdpa(q, keys, values, mask=mask.allowed, scale=self.scale)
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)  # (B, T, Hq*D)
        return self.o_proj(out, norm=self.sub_norm)[0]

    @staticmethod
    def _prefill_ops(qkv: torch.Tensor, kv: LayerWindow | None):
        """The native ops when this call's queries are float32 rows on CPU (kernels.cpp: attention_prefill),
        else None: scaled_dot_product_attention then sums in an order that depends on the call's span."""
        if qkv.dtype != torch.float32 or qkv.device.type != "cpu" \
                or (kv is not None and not (kv.keys.is_contiguous() and kv.values.is_contiguous())):
            return None
        return native.ops()

    @staticmethod
    def _decode_ops(qkv: torch.Tensor, kv: LayerWindow | None, mask: AttentionMask):
        """The native ops when this call is one float32 CPU token per row over a cache, else None."""
        if kv is None or mask.positions is None or qkv.shape[1] != 1 or qkv.dtype != torch.float32 \
                or qkv.device.type != "cpu" or not kv.keys.is_contiguous():
            return None
        return native.ops()


class FeedForward(nn.Module):
    def __init__(self, input_norm: RMSNorm, gate_up: BitLinear, down: BitLinear, sub_norm: RMSNorm | None, act: str):
        super().__init__()
        self.input_norm, self.gate_up, self.down, self.sub_norm, self.act = input_norm, gate_up, down, sub_norm, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) residual stream -> down(sub_norm(act(gate) * up)) (B, T, H)."""
        gate_up, act_scale = self.gate_up.accumulate(x.reshape(-1, x.shape[-1]), norm=self.input_norm)  # (M, 2F)
        z, row_scale = self._activate(gate_up, act_scale, x.dtype)  # (M, F), (M, 1)
        return self.down(z, norm=self.sub_norm, row_scale=row_scale)[0].view_as(x)

    def _activate(self, acc: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate/up accumulators (M, 2F) -> (z (M, F), row factor (M, 1)) with act(gate)·up = factor · z.

        For relu² on int32 accumulators of a float32 model, z is the accumulators themselves: the
        down projection forms relu(g)²·u as it quantizes (BitLinear.accumulate)."""
        (g0, g1), (u0, u1) = self.gate_up.bounds
        inv = act_scale.reciprocal()  # (M, 1)
        if self.act == "relu2":
            # relu(a·g)²·(b·u) = a²b · relu(g)²·u with a = β_g/s, b = β_u/s per row: work on the integer
            # accumulators and hand the row factor to the down projection's norm + quantization.
            factor = (inv * self.gate_up.betas[0]).square_() * (inv * self.gate_up.betas[1])
            if acc.dtype == torch.int32 and dtype == torch.float32:
                return acc, factor
            up = acc[:, u0:u1].to(dtype)
            return acc[:, g0:g1].to(dtype).clamp_(min=0).square_().mul_(up), factor
        up = acc[:, u0:u1].to(dtype)
        gate = acc[:, g0:g1] * (inv * self.gate_up.betas[0])
        return F.silu(gate.to(dtype)).mul_(up), (inv * self.gate_up.betas[1]).to(dtype)


class Block(nn.Module):
    def __init__(self, attention: Attention, ffn: FeedForward):
        super().__init__()
        self.attention, self.ffn = attention, ffn

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerWindow | None,
                mask: AttentionMask) -> torch.Tensor:
        h = h + self.attention(h, cos, sin, kv, mask)  # a new tensor: the caller's h is never modified
        return h.add_(self.ffn(h))


LAYER_TENSORS = 11  # decode_stack's tensors per layer (kernels.cpp: kLayerTensors)


class _StackArgs(NamedTuple):
    """decode_stack's fixed arguments, and where each came from (to notice a replaced tensor)."""

    weights: list  # LAYER_TENSORS per layer, in kernels.cpp's order (kLayerTensorNames)
    betas: list  # (β_gate, β_up) per layer
    eps: float
    heads: tuple  # (num_heads, num_kv_heads, head_dim, scale)
    backends: tuple  # the projections' backend preferences, each distinct one once
    sources: list  # (dict, key, object) for every module, tensor, scale, eps and backend gathered


def _take(sources: list, module: nn.Module, name: str):
    """module.name (a submodule, parameter, buffer or plain attribute), recording where it lives."""
    for holder in (module._modules, module._parameters, module._buffers, module.__dict__):
        if name in holder:
            sources.append((holder, name, holder[name]))
            return holder[name]
    raise AttributeError(name)


class DecodeStack:
    """A stack of blocks' decode step as one native call (kernels.cpp: decode_stack), where it applies:
    one float32 CPU token per row over a cache, relu² FFNs, packed weights, every projection on the
    native backend, one eps for all norms, one head shape. The op makes the calls Block.forward makes
    on that path, with the same float32 operations, so it changes no bit; it saves the per-call cost
    of some twenty Python calls per layer. The fixed arguments are gathered once and checked on every
    call against the modules they came from: a replaced block, projection, tensor or eps, a changed
    backend (set_backend) or a move (.to()) is seen, and they are gathered again."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks
        self._args: _StackArgs | None = None

    def plan(self, h: torch.Tensor, windows: list[LayerWindow], mask: AttentionMask):
        """(ops, arguments) when this step runs as one decode_stack call, else None."""
        if len(self.blocks) == 0 or len(windows) != len(self.blocks) \
                or Attention._decode_ops(h, windows[0], mask) is None:
            return None
        args = self._args
        if args is None or not self._current(args):
            args = self._args = self._gather(h)
        if args is None or not all(w.keys.is_contiguous() and w.values.is_contiguous() for w in windows):
            return None
        if any(kernels.select_backend(b, h.shape[0], h.dtype, h.device, h.shape[-1]) != "native" for b in args.backends):
            return None
        return native.ops(), args

    def run(self, plan, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows: list[LayerWindow],
            mask: AttentionMask) -> torch.Tensor:
        """h (B, 1, H) -> h after every block (B, 1, H); each block's K/V written to its window."""
        ops, args = plan
        num_heads, num_kv_heads, head_dim, scale = args.heads
        out = ops.decode_stack(h.view(h.shape[0], -1), args.weights, args.betas, args.eps, cos.reshape(-1, head_dim),
                               sin.reshape(-1, head_dim), [w.keys for w in windows], [w.values for w in windows],
                               mask.positions, num_heads, num_kv_heads, scale, native.isa())
        return out.view_as(h)

    def _current(self, args: _StackArgs) -> bool:
        return args.sources[0][0] is self.blocks._modules and len(self.blocks) * LAYER_TENSORS == len(args.weights) \
            and all(holder.get(name) is value for holder, name, value in args.sources)

    def _gather(self, h: torch.Tensor) -> _StackArgs | None:
        weights, betas, sources, backends, eps, heads = [], [], [], set(), set(), set()
        sources.append((self.blocks._modules, "", None))  # marks which ModuleList these came from

        def weight(norm):  # an optional norm's weight
            return _take(sources, norm, "weight") if norm is not None else None

        def packed(linear, with_scale=True):  # packed weights (and the per-column β)
            taken = [_take(sources, linear, "ternary_weights")]
            return taken + [_take(sources, linear, "col_scale")] if with_scale else taken

        for index in range(len(self.blocks)):
            block = _take(sources, self.blocks, str(index))
            a, f = _take(sources, block, "attention"), _take(sources, block, "ffn")
            in_a, qkv, sub_a, o_proj = (_take(sources, a, n) for n in ("input_norm", "qkv", "sub_norm", "o_proj"))
            in_f, gate_up, sub_f, down = (_take(sources, f, n) for n in ("input_norm", "gate_up", "sub_norm", "down"))
            layer_linears = (qkv, o_proj, gate_up, down)
            if f.act != "relu2" or any(linear.fused_ops(h, "native") is None for linear in layer_linears):
                return None
            # kernels.cpp kLayerTensorNames: attn_norm, qkv (+β), attn_sub_norm, o_proj (+β), ffn_norm,
            # gate_up, ffn_sub_norm, down (+β)
            weights += [weight(in_a), *packed(qkv), weight(sub_a), *packed(o_proj), weight(in_f),
                        *packed(gate_up, with_scale=False), weight(sub_f), *packed(down)]
            betas += _take(sources, gate_up, "betas")
            backends |= {_take(sources, linear, "backend") for linear in layer_linears}
            eps |= {_take(sources, n, "eps") for n in (in_a, sub_a, in_f, sub_f) if n is not None}
            heads.add((a.num_heads, a.num_kv_heads, a.head_dim, a.scale))
        if len(eps) != 1 or len(heads) != 1:
            return None  # the op takes one eps and one head shape for the whole stack
        return _StackArgs(weights, betas, eps.pop(), heads.pop(), tuple(backends), sources)
