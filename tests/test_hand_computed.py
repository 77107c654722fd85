"""One BitLinear, one RMSNorm position and one RoPE position, worked out by hand (docs/exactness.md).

Every expected number below is written as a literal with its derivation in the comments; nothing is
computed by the code under test or by a second implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from pybitnet.kernels import BACKENDS, available_backends
from pybitnet.layers import BitLinear, RMSNorm, RotaryTables, apply_rope
from pybitnet.quant import quantize_activations
from pybitnet.weights import TernaryWeight

# ----------------------------------------------------------------------------- BitLinear, 3x4
# Ternary weights T (out=3, in=4) and beta = 0.25 (multiply semantics: W = T * beta).
TERNARY = [[1, -1, 0, 1],
           [0, 1, 1, -1],
           [-1, 0, 1, 1]]
BETA = 0.25
# Three input rows (M=3, K=4):
INPUTS = [
    # Row A: absmax = 254, s_x = 127/254 = 0.5 (exact).
    #   x * s_x = [2.5, -3.5, 127, -0.5]; round half to EVEN -> [2, -4, 127, 0]
    #   (half away from zero would give [3, -4, 127, -1]: this row tells the two apart).
    [5.0, -7.0, 254.0, -1.0],
    # Row B: absmax = 2, s_x = 127/2 = 63.5.
    #   x * s_x = [31.75, -63.5, 15.875, 127]; rounded -> [32, -64, 16, 127] (-63.5 is a tie -> -64, even).
    [0.5, -1.0, 0.25, 2.0],
    # Row C: absmax = 4e-6 is below the 1e-5 floor, so s_x = 127/1e-5 = 1.27e7 (not 127/4e-6 = 3.175e7).
    #   x * s_x = [12.7, 0, 0, -50.8]; rounded -> [13, 0, 0, -51].
    [1e-6, 0.0, 0.0, -4e-6],
]
ACT_SCALES = [0.5, 63.5, 1.27e7]
QUANTIZED = [[2, -4, 127, 0],
             [32, -64, 16, 127],
             [13, 0, 0, -51]]
# Integer accumulators acc[m, n] = sum_k q[m, k] * T[n, k]:
#   A: n0 =  2 + 4 + 0 + 0       =    6   n1 = 0 - 4 + 127 - 0 =  123   n2 = -2 + 0 + 127 + 0 =  125
#   B: n0 = 32 + 64 + 0 + 127    =  223   n1 = 0 - 64 + 16 - 127 = -175 n2 = -32 + 0 + 16 + 127 = 111
#   C: n0 = 13 - 0 + 0 - 51      =  -38   n1 = 0 + 0 + 0 + 51 =    51   n2 = -13 + 0 + 0 - 51 =  -64
ACCUMULATORS = [[6, 123, 125],
                [223, -175, 111],
                [-38, 51, -64]]
# Outputs y = acc / s_x * beta:
#   A: acc / 0.5 * 0.25 = acc * 0.5      -> [3.0, 61.5, 62.5]
#   B: acc / 63.5 * 0.25 = acc / 254     -> [223/254, -175/254, 111/254]
#                                         = [0.87795275590551181, -0.68897637795275591, 0.43700787401574803]
#   C: acc / 1.27e7 * 0.25 = acc / 5.08e7 -> [-38/5.08e7, 51/5.08e7, -64/5.08e7]
#                                         = [-7.4803149606299213e-07, 1.0039370078740157e-06, -1.2598425196850394e-06]
OUTPUTS = [[3.0, 61.5, 62.5],
           [0.87795275590551181, -0.68897637795275591, 0.43700787401574803],
           [-7.4803149606299213e-07, 1.0039370078740157e-06, -1.2598425196850394e-06]]
# Tolerances: float64 rounds acc * (beta / s_x) vs acc / s_x * beta at ~1e-16; float32 at ~1e-7.
REL_TOL = {torch.float64: 1e-14, torch.float32: 1e-6}


def _linear(backend: str = "reference", parts: list[tuple[slice, float]] | None = None) -> BitLinear:
    values = torch.tensor(TERNARY, dtype=torch.int8)
    parts = parts or [(slice(0, 3), BETA)]
    return BitLinear([TernaryWeight(values[rows], beta) for rows, beta in parts], backend=backend)


# Every backend, each reported as skipped (with why) where this install lacks it.
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.skipif(
    b not in available_backends(), reason=f"kernel backend {b!r} is not built here (no compiler, or PYBITNET_NATIVE=0)"))
    for b in BACKENDS]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_activation_quantization_by_hand(dtype):
    q, act_scale = quantize_activations(torch.tensor(INPUTS, dtype=dtype))
    assert q.tolist() == QUANTIZED
    assert act_scale.flatten().tolist() == pytest.approx(ACT_SCALES, rel=REL_TOL[dtype])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bitlinear_accumulate_by_hand(backend, dtype):
    acc, act_scale = _linear(backend).accumulate(torch.tensor(INPUTS, dtype=dtype))
    assert acc.shape == (3, 3)
    assert acc.tolist() == ACCUMULATORS  # exact integers whatever the backend
    assert act_scale.flatten().tolist() == pytest.approx(ACT_SCALES, rel=REL_TOL[dtype])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bitlinear_forward_by_hand(backend, dtype):
    (y,) = _linear(backend)(torch.tensor(INPUTS, dtype=dtype))
    assert y.dtype == dtype and y.shape == (3, 3)
    for got, want in zip(y.tolist(), OUTPUTS):
        assert got == pytest.approx(want, rel=REL_TOL[dtype], abs=0)


def test_bitlinear_fused_parts_by_hand():
    """Rows 0-1 as one part (beta 0.25) and row 2 as another (beta 0.5): one GEMM, per-part beta.
    Part 1 is row 2's accumulator * 0.5 / s_x, i.e. twice column 2 of OUTPUTS."""
    first, second = _linear(parts=[(slice(0, 2), 0.25), (slice(2, 3), 0.5)])(torch.tensor(INPUTS, dtype=torch.float64))
    assert first.shape == (3, 2) and second.shape == (3, 1)
    for m in range(3):
        assert first[m].tolist() == pytest.approx(OUTPUTS[m][:2], rel=1e-14, abs=0)
        assert second[m, 0].item() == pytest.approx(2 * OUTPUTS[m][2], rel=1e-14, abs=0)


def test_bitlinear_keeps_leading_dims():
    x = torch.tensor(INPUTS, dtype=torch.float64).view(1, 3, 4)  # (B, T, K)
    (y,) = _linear()(x)
    assert y.shape == (1, 3, 3)
    assert y[0, 0].tolist() == [3.0, 61.5, 62.5]


# ----------------------------------------------------------------------------- RMSNorm, one position
# x = [1, 2, 3, 4], weight = [1, 0.5, 2, -1], eps = 0.5 (large on purpose: it must sit inside the sqrt,
# added to the mean of squares):
#   mean(x^2) = (1 + 4 + 9 + 16) / 4 = 7.5;  + eps = 8;  1/sqrt(8) = 1/(2*sqrt(2)) = 0.35355339059327373
#   x / rms = [0.35355339059327373, 0.70710678118654746, 1.0606601717798212, 1.4142135623730949]
#   * weight = [0.35355339059327373, 0.35355339059327373, 2.1213203435596424, -1.4142135623730949]
#            = [sqrt(2)/4, sqrt(2)/4, 3*sqrt(2)/2, -sqrt(2)]
# (with eps added to the rms instead, 1/(sqrt(7.5) + 0.5) = 0.3087... would be used: far off.)
RMS_OUT = [0.35355339059327373, 0.35355339059327373, 2.1213203435596424, -1.4142135623730949]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rmsnorm_by_hand(dtype):
    norm = RMSNorm(torch.tensor([1.0, 0.5, 2.0, -1.0], dtype=dtype), eps=0.5)
    got = norm(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=dtype))
    assert got.shape == (1, 4) and got.dtype == dtype
    assert got[0].tolist() == pytest.approx(RMS_OUT, rel=REL_TOL[dtype], abs=0)
    assert RMS_OUT == pytest.approx([math.sqrt(2) / 4, math.sqrt(2) / 4, 3 * math.sqrt(2) / 2, -math.sqrt(2)])


# ----------------------------------------------------------------------------- RoPE, one position
# NeoX RoPE, head dim D = 4, theta = 10000, position p = 3:
#   inv_freq[i] = theta^(-2i/D): i=0 -> 1,  i=1 -> 10000^(-1/2) = 0.01
#   angles = p * inv_freq = [3, 0.03]; the tables repeat them: cos = [cos 3, cos .03, cos 3, cos .03]
#   cos 3 = -0.98999249660044542   sin 3 = 0.14112000805986721
#   cos .03 = 0.99955003374898754  sin .03 = 0.029995500202495664
# Pairs are (i, i + D/2) = (0, 2) and (1, 3); with x = [1, 2, 3, 4]:
#   x'0 = x0 cos3 - x2 sin3     = -0.98999249660 - 0.42336002418 = -1.4133525207800470
#   x'1 = x1 cos.03 - x3 sin.03 = 1.99910006750 - 0.11998200081  =  1.8791180666879925
#   x'2 = x2 cos3 + x0 sin3     = -2.96997748980 + 0.14112000806 = -2.8288574817414690
#   x'3 = x3 cos.03 + x1 sin.03 = 3.99820013500 + 0.05999100040  =  4.0581911354009420
# (GPT-J style adjacent pairs (0,1), (2,3) would give x'0 = x0 cos3 - x1 sin3 = -1.2722...: different.)
ROPE_COS = [-0.98999249660044542, 0.99955003374898754, -0.98999249660044542, 0.99955003374898754]
ROPE_SIN = [0.14112000805986721, 0.029995500202495664, 0.14112000805986721, 0.029995500202495664]
ROPE_OUT = [-1.4133525207800470, 1.8791180666879925, -2.8288574817414690, 4.0581911354009420]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rope_tables_by_hand(dtype):
    tables = RotaryTables(head_dim=4, theta=10000.0, dtype=dtype, device=torch.device("cpu"), length=2)
    cos, sin = tables.at(torch.tensor([3]))  # grows the tables past the initial length
    assert cos.shape == (1, 4) and cos.dtype == dtype
    assert cos[0].tolist() == pytest.approx(ROPE_COS, rel=REL_TOL[dtype], abs=0)
    assert sin[0].tolist() == pytest.approx(ROPE_SIN, rel=REL_TOL[dtype], abs=0)
    span_cos, span_sin = tables.span(3, 1)
    assert torch.equal(span_cos, cos) and torch.equal(span_sin, sin)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_apply_rope_by_hand(dtype):
    tables = RotaryTables(head_dim=4, theta=10000.0, dtype=dtype, device=torch.device("cpu"), length=8)
    cos, sin = tables.span(3, 1)  # (T=1, D)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype).view(1, 1, 1, 4)  # (B, T, H, D)
    got = apply_rope(x, cos[None, :, None, :], sin[None, :, None, :])
    assert got.shape == (1, 1, 1, 4)
    assert got.flatten().tolist() == pytest.approx(ROPE_OUT, rel=REL_TOL[dtype], abs=0)
    # a rotation: the norm of each pair is kept (1^2 + 3^2 = 10, 2^2 + 4^2 = 20)
    assert float(got[..., 0] ** 2 + got[..., 2] ** 2) == pytest.approx(10.0, rel=REL_TOL[dtype])
    assert float(got[..., 1] ** 2 + got[..., 3] ** 2) == pytest.approx(20.0, rel=REL_TOL[dtype])
