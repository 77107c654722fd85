"""BitLinear kernel backends: integer accumulators q · Tᵀ for int8-valued activations and ternary weights.

Every backend returns the *same* accumulators bit for bit (docs/exactness.md): partial sums are integers
below 128·K < 2²⁴, exact in fp32/fp64 and in int32, in any summation order. So a backend is picked
by speed alone:

    reference    q (float dtype) @ T.to(dtype)ᵀ            any dtype, any device; the baseline
    int8         torch._int_mm(q int8, T int8) -> int32    packed weights are unpacked, one layer at a
                                                           time, into a reused per-thread int8 buffer
    native       the C++ kernel on the packed weights      CPU; reads each packed byte once per call
                 (native/kernels.cpp, AVX-512 VNNI or AVX2) for all rows of a decode batch

Weight storage (`weight_storage`): on CPU a BitLinear keeps only the packed 2-bit form
(quant/packed.py); on other devices (CUDA) it keeps int8 (N, K), which `_int_mm` (cuBLASLt) reads.

Dispatch (`select_backend`, the one place that decides, per device, dtype and row count):
    float64 activations              -> reference (the exactness tests' plain path)
    CUDA                             -> int8 for more than 16 rows with K, N multiples of 8, else reference
    CPU, native kernels built        -> native up to NATIVE_MAX_ROWS rows (decode batches, short blocks),
                                        int8 (unpack + `_int_mm`) above (prefill: a GEMM's compute
                                        dwarfs the unpacking)
    CPU, no native kernels           -> int8 (the pure-PyTorch fallback)
`PYBITNET_NATIVE=0` at process start forces the fallback; `PYBITNET_NATIVE_ISA=avx2` the AVX2 body of the native kernel.
"""

from __future__ import annotations

import threading

import torch

from . import native
from .errors import ConfigError
from .quant.packed import pack_ternary, padded_features, unpack_ternary

BACKENDS = ("reference", "int8", "native")
AUTO = "auto"
# fp32 holds integers exactly up to 2**24; |q| <= 128 bounds a K-long dot product by 128*K.
FP32_EXACT_K = (1 << 24) // 128
# Above this many rows the unpacked-int8 GEMM beats the packed GEMV (see docs/kernels.md).
NATIVE_MAX_ROWS = 64

_scratch = threading.local()  # per-thread int8 buffer for unpacked weights: threads may share a model


def native_available() -> bool:
    return native.ops() is not None


def available_backends() -> tuple[str, ...]:
    """The backends that run here: `native` only when its library was built and loaded."""
    return BACKENDS if native_available() else tuple(b for b in BACKENDS if b != "native")


def check_backend(name: str) -> str:
    if name != AUTO and name not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {name!r}; choose one of: {AUTO}, {', '.join(BACKENDS)}")
    return name


def weight_storage(device: torch.device) -> str:
    """How BitLinear holds its weights on `device`: 'packed' (2 bits) on CPU, 'int8' elsewhere."""
    return "packed" if torch.device(device).type == "cpu" else "int8"


def select_backend(preference: str, rows: int, dtype: torch.dtype, device: torch.device, in_features: int,
                   out_features: int = 8) -> str:
    """The backend to run `rows` rows with: the preference, or the fastest exact one for `auto`."""
    if preference != AUTO:
        return preference
    if dtype == torch.float64:
        return "reference"  # exactness tests: the plain float64 path
    if device.type != "cpu":  # cuBLASLt int8: more than 16 rows, K and N multiples of 8
        return "int8" if (rows > 16 and in_features % 8 == 0 and out_features % 8 == 0) else "reference"
    if rows <= NATIVE_MAX_ROWS and native_available():
        return "native"
    return "int8"


def quantizes_to_int8(backend: str) -> bool:
    """Whether `backend` takes its activations as int8 (else as integer values in a float dtype)."""
    return backend in ("int8", "native")


def accumulate(q: torch.Tensor, weights: torch.Tensor, backend: str) -> torch.Tensor:
    """q (M, K) integer-valued (float or int8) x ternary weights -> accumulators (M, N).

    `weights` is int8 (N, K) or packed uint8 (N, ceil(K/256) * 64) (quant/packed.py; K is q's width).
    Returns int32 for `int8` and `native`, otherwise the float dtype of q (float64 when q is int8);
    the values are the same integers whatever the backend.
    """
    k = q.shape[1]
    if backend == "native":
        ops = native.ops()
        if ops is None:
            raise ConfigError("kernel backend 'native' is not available (no native kernels were built); "
                              "use 'auto', 'int8' or 'reference'")
        packed = weights if weights.dtype == torch.uint8 else pack_ternary(weights)
        return ops.ternary_matmul(_as_int8(q), packed, k, native.isa())
    if backend == "int8":
        if weights.dtype == torch.uint8:
            return torch._int_mm(_pad_columns(_as_int8(q), padded_features(k)), _unpacked(weights, k).t())
        return torch._int_mm(_as_int8(q), weights.t())
    if backend == "reference":
        if q.dtype == torch.float32 and k > FP32_EXACT_K:
            q = q.double()  # keep the integer sums exact past 2**24 (docs/exactness.md guard)
        dtype = q.dtype if q.dtype.is_floating_point else torch.float64
        values = unpack_ternary(weights, k)[:, :k] if weights.dtype == torch.uint8 else weights
        return q.to(dtype) @ values.to(dtype).t()
    raise ConfigError(f"unknown kernel backend {backend!r}")


def _unpacked(packed: torch.Tensor, k: int) -> torch.Tensor:
    """packed (N, KB*64) -> int8 (N, KB*256) in this thread's reused buffer (valid until the next call)."""
    n, cols = packed.shape
    size = n * cols * 4
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size or buffer.device != packed.device:
        buffer = _scratch.buffer = torch.empty(size, dtype=torch.int8, device=packed.device)
    out = buffer[:size].view(n, cols * 4)
    ops = native.ops() if packed.device.type == "cpu" else None
    if ops is not None:
        return ops.unpack_ternary(packed, out, native.isa())
    return unpack_ternary(packed, k, out=out)


def _pad_columns(q: torch.Tensor, width: int) -> torch.Tensor:
    """q (M, K) -> (M, width) with zero columns past K (they meet the packed padding's zero weights)."""
    if q.shape[1] == width:
        return q
    padded = q.new_zeros(q.shape[0], width)
    padded[:, : q.shape[1]] = q
    return padded


def _as_int8(q: torch.Tensor) -> torch.Tensor:
    return q if q.dtype == torch.int8 else q.to(torch.int8)
