"""Every kernel backend gives the reference accumulators bit for bit (docs/exactness.md)."""

from __future__ import annotations

import pytest
import torch

from pybitnet import kernels, synthetic
from pybitnet.errors import ConfigError
from pybitnet.layers import BitLinear, RMSNorm
from pybitnet.quant.packed import pack_ternary
from pybitnet.weights import TernaryWeight

SHAPES = [(1, 64, 32), (3, 2560, 640), (17, 128, 96), (64, 6912, 256), (5, 100, 7)]


def _ternary(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("backend", kernels.available_backends())
def test_backend_accumulators_equal_reference(m, k, n, backend):
    g = torch.Generator().manual_seed(m * k + n)
    q = torch.randint(-128, 128, (m, k), generator=g).float()
    w = _ternary(n, k, k)
    expected = q.double() @ w.double().t()  # exact integers
    got = kernels.accumulate(q, w, backend)
    assert torch.equal(got.double(), expected), backend
    assert torch.equal(kernels.accumulate(q, pack_ternary(w), backend).double(), expected), backend
    # worst case magnitudes: every product at its bound
    q_max = torch.full((m, k), -128.0)
    w_ones = torch.ones(n, k, dtype=torch.int8)
    assert torch.equal(kernels.accumulate(q_max, w_ones, backend).double(), torch.full((m, n), -128.0 * k, dtype=torch.float64))


def test_int8_backend_returns_int32_and_reference_keeps_dtype():
    q = torch.randint(-128, 128, (4, 32)).double()
    w = _ternary(8, 32, 0)
    assert kernels.accumulate(q, w, "int8").dtype == torch.int32
    assert kernels.accumulate(q, w, "reference").dtype == torch.float64
    if kernels.native_available():
        assert kernels.accumulate(q, pack_ternary(w), "native").dtype == torch.int32


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown kernel backend 'fp8'"):
        kernels.check_backend("fp8")


def test_reference_guards_the_fp32_exactness_bound():
    k = kernels.FP32_EXACT_K + 64  # a K whose sums can pass 2**24
    q = torch.full((1, k), 127.0)
    w = torch.ones(2, k, dtype=torch.int8)
    q[0, 0] = 1.0  # an odd total above 2**24: not representable in fp32
    expected = 127 * (k - 1) + 1
    assert int(kernels.accumulate(q, w, "reference")[0, 0]) == expected
    assert int(kernels.accumulate(q, w, "int8")[0, 0]) == expected


@pytest.mark.parametrize("native_built", [True, False])
def test_auto_dispatch_per_device_dtype_and_rows(monkeypatch, native_built):
    monkeypatch.setattr(kernels, "native_available", lambda: native_built)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small = "native" if native_built else "int8"
    assert kernels.select_backend("auto", 1, torch.float32, cpu, 2560) == small
    assert kernels.select_backend("auto", kernels.NATIVE_MAX_ROWS, torch.float32, cpu, 2560) == small
    assert kernels.select_backend("auto", kernels.NATIVE_MAX_ROWS + 1, torch.float32, cpu, 2560) == "int8"
    assert kernels.select_backend("auto", 512, torch.float64, cpu, 2560) == "reference"
    assert kernels.select_backend("int8", 1, torch.float64, cpu, 2560) == "int8"
    # CUDA: cuBLASLt int8 needs more than 16 rows and K, N multiples of 8; never the CPU kernel
    assert kernels.select_backend("auto", 512, torch.float32, cuda, 2560, 640) == "int8"
    assert kernels.select_backend("auto", 16, torch.float32, cuda, 2560, 640) == "reference"
    assert kernels.select_backend("auto", 512, torch.float32, cuda, 100, 640) == "reference"
    assert kernels.weight_storage(cpu) == "packed" and kernels.weight_storage(cuda) == "int8"


def test_native_backend_without_the_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels.native, "ops", lambda: None)
    with pytest.raises(ConfigError, match="'native' is not available"):
        kernels.accumulate(torch.zeros(1, 256), torch.zeros(1, 64, dtype=torch.uint8), "native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_and_step_rows_give_identical_accumulators(dtype):
    """The same input row yields the same integers alone (step path) and inside a block (full path)."""
    g = torch.Generator().manual_seed(1)
    parts = [TernaryWeight(_ternary(96, 256, 1), 0.02), TernaryWeight(_ternary(32, 256, 2), 0.03)]
    norm = RMSNorm((1 + 0.1 * torch.randn(256, generator=g)).to(dtype), 1e-5)
    x = torch.randn(40, 256, generator=g, dtype=dtype) * 3
    for backend in kernels.available_backends():
        layer = BitLinear(parts, backend)
        block_acc, block_scale = layer.accumulate(x, norm=norm)
        for row in (0, 17, 39):
            row_acc, row_scale = layer.accumulate(x[row : row + 1], norm=norm)
            assert torch.equal(row_acc, block_acc[row : row + 1]), (backend, row)
            assert torch.equal(row_scale, block_scale[row : row + 1])


def test_every_backend_runs_the_model_under_the_rules():
    from rules import assert_float32_rule, assert_float64_rule

    model64 = synthetic.random_model("tiny", seed=5, dtype=torch.float64)
    tokens = torch.randint(0, 512, (2, 33))
    ref = model64.forward_full(tokens)
    for backend in kernels.available_backends():
        model64.set_backend(backend)
        assert_float64_rule(model64.forward_full(tokens), ref)
        assert_float64_rule(model64.forward_step_by_step(tokens), ref)
    model32 = synthetic.random_model("tiny", seed=5, dtype=torch.float32)
    for backend in kernels.available_backends():
        model32.set_backend(backend)
        assert_float32_rule(model32.forward_full(tokens), ref)


@pytest.mark.parametrize("with_norm", [True, False])
def test_fused_norm_quantization_equals_materialized(with_norm):
    """quantize_normed(x, c, w) quantizes RMSNorm(c * x) (or c * x) without building it: same integers,
    same scale (float64 random rows, where exact rounding ties do not occur)."""
    from pybitnet.quant.activations import quantize_activations, quantize_normed

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 300, generator=g, dtype=torch.float64) * 1e6  # unscaled integer-product magnitudes
    c = torch.rand(64, 1, generator=g, dtype=torch.float64) * 1e-9 + 1e-12
    w = torch.rand(300, generator=g, dtype=torch.float64) + 0.5
    scaled = c * x
    target = RMSNorm(w, 1e-5)(scaled) if with_norm else scaled
    q_ref, s_ref = quantize_activations(target)
    q, s = quantize_normed(x, c, w if with_norm else None, 1e-5)
    assert torch.equal(q, q_ref)
    assert torch.allclose(s, s_ref, rtol=1e-12)
