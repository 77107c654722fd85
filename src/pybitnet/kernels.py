"""BitLinear kernel backends: integer accumulators q · Tᵀ for int8-valued activations and ternary weights.

Every backend returns the *same* accumulators bit for bit (DESIGN.md §2): partial sums are integers
below 128·K < 2²⁴, exact in fp32/fp64 and in int32, in any summation order. So a backend is picked
by speed alone:

    reference    q (float dtype) @ T.to(dtype)ᵀ           any dtype, any device; the baseline
    int8         torch._int_mm(q int8, T int8) -> int32   VNNI on CPU, cuBLASLt on CUDA

Measured on the 2-core Zen 4 (BENCHMARKS.md): `_int_mm` with the weight as a transposed view of
(out, in) runs the prefill GEMM near 800 GOP/s and the one-row decode GEMV at ~35 GB/s of weights,
so one layout serves both. Two candidates were dropped: torch's weight-only int8 GEMV
(`_weight_int8pack_mm`, exact with fp32 activations) read weights at ~1 GB/s; and a bf16 GEMM is
exact on its inputs, but torch on CPU rounds its *output* to bf16 (no fp32-out bf16 GEMM is
exposed), which breaks integer exactness above 256.
Weights are stored once, as int8 ternary (out, in); no backend keeps a float copy.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

BACKENDS = ("reference", "int8")
AUTO = "auto"
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
    return "int8"


def accumulate(q: torch.Tensor, ternary_weights: torch.Tensor, backend: str) -> torch.Tensor:
    """q (M, K) integer-valued (float or int8) x ternary_weights (N, K) int8 -> accumulators (M, N).

    Returns int32 for `int8`, otherwise the float dtype of q (float64 when q is int8); the values are
    the same integers whatever the backend.
    """
    if backend == "int8":
        return torch._int_mm(_as_int8(q), ternary_weights.t())
    if backend == "reference":
        if q.dtype == torch.float32 and ternary_weights.shape[1] > FP32_EXACT_K:
            q = q.double()  # keep the integer sums exact past 2**24 (DESIGN.md §2 guard)
        dtype = q.dtype if q.dtype.is_floating_point else torch.float64
        return q.to(dtype) @ ternary_weights.to(dtype).t()
    raise ConfigError(f"unknown kernel backend {backend!r}")


def _as_int8(q: torch.Tensor) -> torch.Tensor:
    return q if q.dtype == torch.int8 else q.to(torch.int8)
