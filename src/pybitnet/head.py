"""The output projection (lm_head): final-normed hidden states -> logits over the vocabulary.

Two modes, chosen at load (`pybitnet.load(..., lm_head=...)`):

    exact   logits = h @ Wᵀ with W in its checkpoint dtype (bf16 for 2B-4T, fp16 in GGUF files, fp32 for
            float32 checkpoints) and fp32 products and sums. On CPU with the native kernels, a GEMV
            (native/kernels.cpp) widens each weight once and runs every row of the batch against it,
            reading W once per call.
    int8    opt-in and lossy: per-row int8 activations against a per-row int8 copy of W (scale =
            absmax/127 per vocabulary row), exact int32 sums, like llama.cpp's quantized output
            tensors; half the bytes of bf16 per token. A GGUF block table (below) is not copied: the
            int8 activations run against its blocks (native `quant_head_int8`: exact integer sums per
            lane of 4 elements, each scaled by its group's step and low in one fixed float order), as
            llama.cpp does with its 8-bit activations. scripts: benchmarks/head_agreement.py.

Row independence: a row's logits never depend on the other rows of the batch (a server batches
unrelated requests). The native GEMV computes each (row, vocabulary entry) dot product in one fixed
order whatever the batch size, for bf16, fp16 and fp32 heads alike (a BLAS GEMM would not: its
kernel for 1-3 rows rounds differently from the one for 4 or more); the int8 head's sums are exact
integers. `LMHead.row_independent` says whether a head runs that way.

A GGUF table kept in Q8_0, Q6_K or Q4_K (quant/ggml_blocks.QuantizedTable) is the exact head of its
dequantized values: the native `quant_head` dequantizes each vocabulary row once per call and runs every
row of the batch against it in one fixed order (row independent, the same bits on every instruction
set); without the native kernels LM_HEAD_ROWS vocabulary rows at a time are dequantized and multiplied.
"""

from __future__ import annotations

import torch
from torch import nn

from . import native
from .errors import ConfigError
from .quant.activations import quantize_activations
from .quant.ggml_blocks import NATIVE_KIND, QuantizedTable

HEAD_MODES = ("exact", "int8")
# weight dtypes the native GEMV takes against fp32 rows
NATIVE_HEAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A bf16/f16 head without the native kernels is computed in fp32 this many vocabulary rows at a time.
LM_HEAD_ROWS = 1024


def check_head_mode(mode: str) -> str:
    if mode not in HEAD_MODES:
        raise ConfigError(f"unknown lm_head mode {mode!r}; choose one of: {', '.join(HEAD_MODES)}")
    return mode


class LMHead(nn.Module):
    """logits = h @ Wᵀ, W (V, H) kept in its checkpoint dtype (shared with a tied embedding).

    Without the native kernels, a 16-bit W is widened LM_HEAD_ROWS rows at a time into an fp32
    buffer (a bf16 GEMM on CPU would round its output to bf16). Buffers belong to the call, not the
    module: several threads may run the same model at once.
    """

    def __init__(self, weight: torch.Tensor | QuantizedTable, mode: str = "exact"):
        super().__init__()
        if isinstance(weight, QuantizedTable):  # kept as stored; a module, shared with a tied embedding
            self.weight = weight
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)  # (V, H)
        self.mode = check_head_mode(mode)
        if mode == "int8" and not isinstance(weight, QuantizedTable):  # a block table is used as it is
            codes, scales = quantize_rows_int8(weight)
            self.register_buffer("int8_weight", codes)  # (V, H) int8
            self.register_buffer("int8_scale", scales)  # (V,) float32: W[v] ≈ int8_weight[v] * int8_scale[v]
            self.register_buffer("int8_sum", codes.sum(dim=1, dtype=torch.int32))  # (V,): the native GEMV's offset term

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (M, H) -> (M, V) in h's dtype."""
        if self.mode == "int8":
            return self._int8_logits(h)
        ops = native.ops() if h.device.type == "cpu" else None
        if isinstance(self.weight, QuantizedTable):
            if ops is not None and h.dtype == torch.float32 and self.weight.type_name in NATIVE_KIND:
                return ops.quant_head(h.contiguous(), self.weight.data, NATIVE_KIND[self.weight.type_name], native.isa())
            return self._widened_logits(h)
        if ops is not None and h.dtype == torch.float32 and self.weight.dtype in NATIVE_HEAD_DTYPES:
            return ops.half_matmul(h.contiguous(), self.weight, native.isa())
        if self.weight.dtype == h.dtype:
            return h @ self.weight.t()
        return self._widened_logits(h)

    def row_independent(self, dtype: torch.dtype) -> bool:
        """Whether rows of `dtype` get logits that do not depend on the rest of the batch: the int8
        head (exact integer sums), or the native GEMV (fp32 rows on CPU)."""
        if self.mode == "int8":
            if isinstance(self.weight, QuantizedTable):  # exact integers, then one fixed float order
                return self.weight.device.type == "cpu" and self._native_int8_blocks(native.ops())
            return True
        if isinstance(self.weight, QuantizedTable):
            return (dtype == torch.float32 and self.weight.device.type == "cpu" and self.weight.type_name in NATIVE_KIND
                    and native.ops() is not None)
        return (dtype == torch.float32 and self.weight.device.type == "cpu" and self.weight.dtype in NATIVE_HEAD_DTYPES
                and native.ops() is not None)

    def _int8_logits(self, h: torch.Tensor) -> torch.Tensor:
        ops = native.ops() if h.device.type == "cpu" else None
        if isinstance(self.weight, QuantizedTable):
            if self._native_int8_blocks(ops):
                return ops.quant_head_int8(h.float().contiguous(), self.weight.data, NATIVE_KIND[self.weight.type_name],
                                           native.isa()).to(h.dtype)
            q, act_scale = quantize_activations(h.float())  # (M, H) integer values, (M, 1)
            return (self._widened_logits(q) / act_scale).to(h.dtype)
        if ops is not None and native.has_avx512_vnni():  # the same integers and formula, at bandwidth
            return ops.int8_head(h.float(), self.int8_weight, self.int8_scale, self.int8_sum, native.isa()).to(h.dtype)
        q, act_scale = quantize_activations(h.float(), as_int8=True)  # (M, H) int8, (M, 1)
        acc = torch._int_mm(q, self.int8_weight.t())  # (M, V) int32, exact
        return (acc.float() * (self.int8_scale / act_scale)).to(h.dtype)

    def _native_int8_blocks(self, ops) -> bool:
        """Whether quant_head_int8 runs this block table: AVX-512 VNNI, a native type, rows of 64s."""
        return (ops is not None and native.has_avx512_vnni() and self.weight.type_name in NATIVE_KIND
                and self.weight.shape[1] % 64 == 0)

    def _widened_logits(self, h: torch.Tensor) -> torch.Tensor:
        vocab, width = self.weight.shape
        rows_buffer = torch.empty(min(LM_HEAD_ROWS, vocab), width, dtype=h.dtype, device=h.device)  # (R, H)
        out = torch.empty(h.shape[0], vocab, dtype=h.dtype, device=h.device)  # (M, V)
        for start in range(0, vocab, LM_HEAD_ROWS):
            n = min(LM_HEAD_ROWS, vocab - start)
            rows = rows_buffer[:n].copy_(self.weight[start : start + n])  # a QuantizedTable dequantizes these
            target = out[:, start : start + n]  # (M, n)
            if target.is_contiguous():  # one row: write in place
                torch.mm(h, rows.t(), out=target)
            else:
                target.copy_(h @ rows.t())
        return out


def quantize_rows_int8(weight: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """W (V, H) float -> (codes (V, H) int8, scales (V,) float32) with W[v] ≈ codes[v] * scales[v],
    scale = absmax(W[v]) / 127, in row chunks so no fp32 copy of the whole matrix exists."""
    vocab, width = weight.shape
    codes = torch.empty(vocab, width, dtype=torch.int8, device=weight.device)
    scales = torch.empty(vocab, dtype=torch.float32, device=weight.device)
    for start in range(0, vocab, chunk):
        rows = weight[start : start + chunk].float()
        scale = rows.abs().amax(dim=1).clamp_(min=1e-30) / 127.0  # (n,)
        codes[start : start + chunk] = (rows / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[start : start + chunk] = scale
    return codes, scales
