"""The output projection (lm_head): final-normed hidden states -> logits over the vocabulary.

Modes, chosen at load (`pybitnet.load(..., lm_head=...)`):

    exact   logits = h @ Wᵀ with W as the file holds it: bf16 for 2B-4T, fp16 in GGUF files, fp32 for
            float32 checkpoints, or a GGUF block table (Q8_0, Q6_K, Q5_K, Q4_K, Q4_0) kept as stored (below). fp32 products
            and sums. On CPU with the native kernels, a GEMV (native/kernels.cpp) widens each weight once
            and runs every row of the batch against it, reading W once per call.
    int8    opt-in and lossy: per-row int8 activations against a per-row int8 copy of W (scale =
            absmax/127 per vocabulary row), exact int32 sums, like llama.cpp's quantized output
            tensors; half the bytes of bf16 per token. A GGUF block table (below) is not copied: the
            int8 activations run against its blocks (native `quant_head_int8`: exact integer sums per
            lane of 4 elements, the low folded in where it is a whole number of steps, each scaled by
            its group's step in one fixed float order), as
            llama.cpp does with its 8-bit activations. scripts: benchmarks/head_types.py.
    q8_0, q6_k, q5_k, q4_k, q4_0
            opt-in and lossy: a float W (HF `lm_head` or tied `embed_tokens`, GGUF F16 / BF16 / F32
            `output` or `token_embd`) is quantized at load to ggml's blocks of that type with
            ggml's reference rounding (the bytes `pybitnet convert --embed-type` and llama.cpp write), a
            few rows at a time, and the model keeps the blocks instead of W: 1.06 (Q8_0), 0.82 (Q6_K), 0.69
            (Q5_K), 0.56 (Q4_K, Q4_0) bytes per value against 2 for bf16. The head is then the exact head of the dequantized values, as for a
            GGUF file whose table is stored that way; a tied embedding looks its rows up in the same blocks.
            A table already stored in that block type is kept as it is; one stored in another block type
            is refused (`head_block_type`): quantizing quantized values rounds them twice. Load it with
            lm_head="exact" to run it as stored, or requantize it on purpose with `pybitnet convert`.

Row independence: a row's logits never depend on the other rows of the batch (a server batches
unrelated requests). The native GEMV computes each (row, vocabulary entry) dot product in one fixed
order whatever the batch size, for bf16, fp16 and fp32 heads alike (a BLAS GEMM would not: its
kernel for 1-3 rows rounds differently from the one for 4 or more); the int8 head's sums are exact
integers. `LMHead.row_independent` says whether a head runs that way.

A table kept in Q8_0, Q6_K, Q5_K, Q4_K or Q4_0 (quant/ggml_blocks.QuantizedTable: a GGUF file's, or one quantized
at load) is the exact head of its dequantized values: the native `quant_head` dequantizes each vocabulary
row once per call and runs every row of the batch against it in one fixed order (row independent, the same
bits on every instruction set); without the native kernels LM_HEAD_ROWS vocabulary rows at a time are
dequantized and multiplied.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from . import native
from .errors import ConfigError
from .quant.activations import quantize_activations
from .quant.ggml_blocks import BLOCKS, NATIVE_KIND, QuantizedTable, quantize_rows, row_bytes
from .weights import require_finite

# lm_head modes that keep the output table in a ggml block type -> that type
BLOCK_HEAD_MODES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k": "Q5_K", "q4_k": "Q4_K", "q4_0": "Q4_0"}
HEAD_MODES = ("exact", "int8", *BLOCK_HEAD_MODES)
# A float table is quantized this many rows at a time: the Q6_K / Q4_K quantizers hold ~20 float32
# temporaries of a chunk's size, ~50 MB at 256 rows of 2560, a few percent of a 2B-4T model's RSS.
QUANTIZE_ROWS = 256
# The int8 head is built this many rows at a time: three float32 temporaries of 1024 x 2560 are ~30 MB.
INT8_ROWS = 1024
# weight dtypes the native GEMV takes against fp32 rows
NATIVE_HEAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A bf16/f16 head without the native kernels is computed in fp32 this many vocabulary rows at a time.
LM_HEAD_ROWS = 1024


def check_head_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in HEAD_MODES:
        raise ConfigError(f"unknown lm_head mode {mode!r}; choose one of: {', '.join(HEAD_MODES)}")
    return mode


def head_block_type(mode: str, cols: int | None = None, stored: str | None = None, label: str = "the output table") -> str | None:
    """The ggml block type lm_head `mode` keeps the output table in, None for exact and int8.

    With `cols`, ConfigError unless rows of that many elements are whole blocks; with `stored` (the ggml
    type the table is stored in, when a block type), ConfigError unless it is that very type: the
    values are already rounded to one grid, and a second quantization would round them again."""
    type_name = BLOCK_HEAD_MODES.get(check_head_mode(mode))
    if type_name is None:
        return None
    block = BLOCKS[type_name][0]
    if cols is not None and cols % block:
        raise ConfigError(f"lm_head={mode!r} needs rows that are whole {type_name} blocks of {block} values; "
                          f"{label} has rows of {cols}")
    if stored is not None and stored != type_name:
        raise ConfigError(f"lm_head={mode!r}: {label} is stored as {stored} already, and quantizing it to {type_name} "
                          f"would round its values twice; load it with lm_head='exact' (the table as stored) "
                          f"or 'int8', or requantize it on purpose with `pybitnet convert --embed-type`")
    return type_name


def quantize_table(read_rows: Callable[[int, int], torch.Tensor | np.ndarray], shape: tuple[int, int], type_name: str,
                   label: str, source: str = "weights", chunk: int = QUANTIZE_ROWS) -> QuantizedTable:
    """A float table quantized to ggml's `type_name` blocks (ggml's reference rounding, the bytes of
    `quantize_rows`), read `chunk` rows at a time: `read_rows(start, stop)` gives rows [start, stop) in any
    float dtype, so the whole table never exists in float32 (nor, from a file, in any float at all).

    Each chunk is checked finite first (CheckpointError naming `label`): a NaN would otherwise turn into
    blocks that look valid."""
    rows, cols = shape
    data = torch.empty(rows, row_bytes(type_name, cols), dtype=torch.uint8)
    out = data.numpy()
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        part = read_rows(start, stop)
        part = torch.from_numpy(part) if isinstance(part, np.ndarray) else part
        require_finite(part, label, source)
        out[start:stop] = quantize_rows(part, type_name, chunk=chunk)
    return QuantizedTable(data, type_name, cols)


def head_table(table: torch.Tensor | QuantizedTable, mode: str, label: str = "the output table",
               source: str = "weights") -> torch.Tensor | QuantizedTable:
    """The table lm_head `mode` runs over: `table` itself for exact and int8, or for a block mode its
    blocks (`table` itself when already stored in that type; a float table quantized in row chunks)."""
    stored = table.type_name if isinstance(table, QuantizedTable) else None
    type_name = head_block_type(mode, table.shape[1], stored, label)
    if type_name is None or stored is not None:
        return table
    return quantize_table(lambda start, stop: table[start:stop], tuple(table.shape), type_name, label, source)


class LMHead(nn.Module):
    """logits = h @ Wᵀ, W (V, H) kept in its checkpoint dtype (shared with a tied embedding).

    Without the native kernels, a 16-bit W is widened LM_HEAD_ROWS rows at a time into an fp32
    buffer (a bf16 GEMM on CPU would round its output to bf16). Buffers belong to the call, not the
    module: several threads may run the same model at once.
    """

    def __init__(self, weight: torch.Tensor | QuantizedTable, mode: str = "exact"):
        super().__init__()
        weight = head_table(weight, mode)  # a block mode's blocks (a loader or the model made them already)
        if isinstance(weight, QuantizedTable):  # kept as stored; a module, shared with a tied embedding
            self.weight = weight
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)  # (V, H)
        self.mode = check_head_mode(mode)
        if mode == "int8" and not isinstance(weight, QuantizedTable):  # a block table is used as it is
            codes, scales, sums = quantize_rows_int8(weight)
            self.register_buffer("int8_weight", codes)  # (V, H) int8
            self.register_buffer("int8_scale", scales)  # (V,) float32: W[v] ≈ int8_weight[v] * int8_scale[v]
            self.register_buffer("int8_sum", sums)  # (V,) int32: the native GEMV's offset term

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


def quantize_rows_int8(weight: torch.Tensor | QuantizedTable,
                       chunk: int = INT8_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (V, H) float -> (codes (V, H) int8, scales (V,) float32, sums (V,) int32) with
    W[v] ≈ codes[v] * scales[v], scale = absmax(W[v]) / 127, sums[v] = Σ codes[v].

    Everything runs in row chunks: no fp32 copy of W exists, nor an int32 one of the codes (a whole-matrix
    `codes.sum(dim=1, dtype=torch.int32)` widens all of them first: 1.3 GB for a 2B-4T head)."""
    vocab, width = weight.shape
    codes = torch.empty(vocab, width, dtype=torch.int8, device=weight.device)
    scales = torch.empty(vocab, dtype=torch.float32, device=weight.device)
    sums = torch.empty(vocab, dtype=torch.int32, device=weight.device)
    for start in range(0, vocab, chunk):
        rows = weight[start : start + chunk].float()
        scale = rows.abs().amax(dim=1).clamp_(min=1e-30) / 127.0  # (n,)
        part = codes[start : start + chunk]
        part.copy_((rows / scale[:, None]).round_().clamp_(-127, 127))
        scales[start : start + chunk] = scale
        sums[start : start + chunk] = part.sum(dim=1, dtype=torch.int32)
    return codes, scales, sums
