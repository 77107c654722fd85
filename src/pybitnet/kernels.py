"""BitLinear kernel backends: integer accumulators q · Tᵀ for int8-valued activations and ternary weights.

Every backend returns the *same* accumulators bit for bit (DESIGN.md §2): partial sums are integers
below 128·K < 2²⁴, exact in fp32/fp64 and in int32, in any summation order. So a backend is picked
by speed alone:

    reference    q (float dtype) @ T.to(dtype)ᵀ           any dtype, any device; the baseline
    int8         torch._int_mm(q int8, T int8) -> int32   VNNI on CPU; the prefill (many rows) kernel
    int8_gemv    torch._weight_int8pack_mm(q fp32, T int8) -> fp32 (exact)   the decode (few rows) kernel

A bf16 GEMM would be exact on its inputs but torch on CPU rounds its *output* to bf16 (no fp32-out
bf16 GEMM is exposed), which breaks integer exactness above 256, so there is no bf16 backend.
Weights are stored once, as int8 ternary (out, in); no backend keeps a float copy.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

BACKENDS = ("reference", "int8", "int8_gemv")
AUTO = "auto"
# Below this many rows the weight-only int8 GEMV kernel beats _int_mm (measured, see BENCHMARKS.md).
GEMV_MAX_ROWS = 4
# fp32 holds integers exactly up to 2**24; |q| <= 128 bounds a K-long dot product by 128*K.
FP32_EXACT_K = (1 << 24) // 128


def check_backend(name: str) -> str:
    if name != AUTO and name not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {name!r}; choose one of: {AUTO}, {', '.join(BACKENDS)}")
    return name


def select_backend(preference: str, rows: int, dtype: torch.dtype, device: torch.device, in_features: int,
                   out_features: int = 8) -> str:
    """The backend to run `rows` rows with: the preference, or the fastest exact one for `auto`."""
    if preference != AUTO:
        return preference
    if dtype == torch.float64:
        return "reference"  # exactness tests: the plain float64 path
    if device.type != "cpu":  # cuBLASLt int8: more than 16 rows, K and N multiples of 8
        return "int8" if (rows > 16 and in_features % 8 == 0 and out_features % 8 == 0) else "reference"
    if rows <= GEMV_MAX_ROWS and in_features <= FP32_EXACT_K:
        return "int8_gemv"
    return "int8"


def accumulate(q: torch.Tensor, ternary_weights: torch.Tensor, backend: str) -> torch.Tensor:
    """q (M, K) integer-valued (float or int8) x ternary_weights (N, K) int8 -> accumulators (M, N).

    Returns int32 for `int8`, otherwise the float dtype of q (or fp32 when q is int8); the values are
    the same integers whatever the backend.
    """
    if backend == "int8":
        return torch._int_mm(_as_int8(q), ternary_weights.t())
    if backend == "int8_gemv":
        if ternary_weights.shape[1] > FP32_EXACT_K:
            raise ConfigError(f"int8_gemv is inexact for in_features {ternary_weights.shape[1]} > {FP32_EXACT_K}")
        ones = _unit_scales(ternary_weights.shape[0], ternary_weights.device)
        return torch.ops.aten._weight_int8pack_mm(q.to(torch.float32), ternary_weights, ones)
    if backend == "reference":
        dtype = q.dtype if q.dtype.is_floating_point else torch.float32
        return q.to(dtype) @ ternary_weights.to(dtype).t()
    raise ConfigError(f"unknown kernel backend {backend!r}")


def _as_int8(q: torch.Tensor) -> torch.Tensor:
    return q if q.dtype == torch.int8 else q.to(torch.int8)


_UNIT_SCALES: dict[tuple[int, str], torch.Tensor] = {}


def _unit_scales(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _UNIT_SCALES:
        _UNIT_SCALES[key] = torch.ones(n, dtype=torch.float32, device=device)
    return _UNIT_SCALES[key]
