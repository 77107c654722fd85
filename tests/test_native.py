"""The native kernels: every instruction-set path, the pure-PyTorch fallback and the reference give
the same accumulators; the bf16 head is row-independent; builds fall back cleanly and race safely."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pybitnet import kernels, native, synthetic
from pybitnet.head import LMHead
from pybitnet.quant.packed import pack_ternary

ops = native.ops()
needs_native = pytest.mark.skipif(ops is None, reason="native kernels not built (no compiler or PYBITNET_NATIVE=0)")


def _isas() -> list[str]:
    """Instruction sets this CPU runs: scalar always, AVX2 and AVX-512 when present."""
    if ops is None:
        return []
    features = int(ops.cpu_features())
    names = ["scalar"]
    if features & native.HAS_AVX2:
        names.append("avx2")
    if features & native.HAS_AVX512_VNNI:
        names.append("avx512")
    return names


@needs_native
@settings(max_examples=40, deadline=None, derandomize=True)
@given(m=st.integers(1, 64), n=st.integers(1, 37), k=st.integers(1, 800), seed=st.integers(0, 2**16),
       extreme=st.sampled_from([None, -1, 1]))
def test_every_path_gives_the_reference_accumulators(m, n, k, seed, extreme):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    if extreme is not None:  # every product at its bound: code 0 (-1) or code 2 (+1, 128 masked in place)
        q.fill_(-128)
        w.fill_(extreme)
    expected = (q.double() @ w.double().t()).to(torch.int32)
    packed = pack_ternary(w)
    unpacked = torch.empty(n, packed.shape[1] * 4, dtype=torch.int8)
    for isa in _isas():
        assert torch.equal(ops.ternary_matmul(q, packed, k, native.ISA_IDS[isa]), expected), isa
        ops.unpack_ternary(packed, unpacked, native.ISA_IDS[isa])
        assert torch.equal(unpacked[:, :k], w) and not unpacked[:, k:].any(), isa
    assert torch.equal(kernels.accumulate(q, packed, "int8"), expected)  # unpack + _int_mm
    assert torch.equal(kernels.accumulate(q.double(), packed, "reference").to(torch.int32), expected)
    assert torch.equal(kernels.accumulate(q, packed, "native"), expected)


def test_fallback_unpacking_is_pure_torch(monkeypatch):
    """With the library disabled, the int8 backend unpacks with torch ops and still matches."""
    monkeypatch.setattr(native, "ops", lambda: None)
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-1, 2, (9, 300), generator=g, dtype=torch.int8)
    q = torch.randint(-128, 128, (3, 300), generator=g, dtype=torch.int8)
    assert kernels.available_backends() == ("reference", "int8")
    assert kernels.select_backend("auto", 1, torch.float32, torch.device("cpu"), 300) == "int8"
    assert torch.equal(kernels.accumulate(q, pack_ternary(w), "int8"), (q.double() @ w.double().t()).to(torch.int32))


@needs_native
def test_forced_avx2_runs_the_model_within_the_float32_rule(monkeypatch):
    """BitLinear accumulators are integers on every instruction set; attention's and the head's float32
    sums run in AVX2 lanes instead of AVX-512 lanes, so hidden states and logits meet the float32 rule."""
    from rules import assert_float32_rule

    model = synthetic.random_model("tiny", seed=2)
    tokens = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    hidden = next(model.hidden_states(tokens))[1]
    logits = model.forward_full(tokens)
    monkeypatch.setenv("PYBITNET_NATIVE_ISA", "avx2")
    assert native.isa() == native.ISA_IDS["avx2"]
    assert_float32_rule(next(model.hidden_states(tokens))[1], hidden)
    assert_float32_rule(model.forward_full(tokens), logits)


def test_unknown_isa_name_is_a_clear_error(monkeypatch):
    from pybitnet.errors import ConfigError

    monkeypatch.setenv("PYBITNET_NATIVE_ISA", "sse9")
    with pytest.raises(ConfigError, match="PYBITNET_NATIVE_ISA='sse9'"):
        native.isa()


@needs_native
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_head_matches_float64_and_is_row_independent(monkeypatch, isa, dtype):
    if isa not in _isas():
        pytest.skip(f"CPU lacks {isa}")
    monkeypatch.setenv("PYBITNET_NATIVE_ISA", isa)
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(999, 200, generator=g) * 0.05).to(dtype)  # H not a multiple of the vector width
    h = torch.randn(11, 200, generator=g)
    head = LMHead(weight)
    logits = head(h)
    expected = h.double() @ weight.double().t()
    assert (logits.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    for rows in (slice(0, 1), slice(3, 4), slice(2, 9), slice(10, 11)):
        assert torch.equal(head(h[rows]), logits[rows])  # the same bits alone or in any batch


@needs_native
def test_decode_with_a_float32_head_gives_a_row_the_same_bits_in_any_batch(one_thread):
    """An untied float32 lm_head (a float32 checkpoint): a row's decode logits are the same bits alone
    and with 1..7 neighbours (a BLAS GEMM rounds 1-3 rows differently from 4 or more)."""
    from pybitnet import preset
    from pybitnet.model import Transformer

    config = preset("tiny").replace(tie_word_embeddings=False)
    model = Transformer(config, synthetic.random_weights(config, 3, embed_dtype=torch.float32))
    assert model.lm_head.weight.dtype == torch.float32 and model.decode_is_row_independent()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (8, 6), generator=g)
    lengths = [6, 3, 5, 2, 6, 4, 1, 5]  # ragged: rows end at different positions
    following = torch.randint(0, config.vocab_size, (8,), generator=g)

    def decode(rows: list[int]) -> torch.Tensor:
        cache = model.new_cache(batch_size=len(rows), max_len=16)
        for slot, row in enumerate(rows):  # each prompt prefilled on its own, then one step for all rows
            alone = model.new_cache(batch_size=1, max_len=16)
            model.prefill(prompts[row : row + 1, : lengths[row]], alone)
            cache.copy_rows(alone, [0], [slot])
        return model.decode_step(following[rows], cache)

    alone = {row: decode([row])[0] for row in range(8)}
    for size in range(1, 9):
        batch = decode(list(range(size)))
        for row in range(size):
            assert torch.equal(batch[row], alone[row]), (size, row)


def test_int8_head_is_close_and_row_independent():
    g = torch.Generator().manual_seed(8)
    weight = (torch.randn(2000, 256, generator=g) * 0.05).bfloat16()
    h = torch.randn(64, 256, generator=g)
    exact = h.double() @ weight.double().t()
    head = LMHead(weight, "int8")
    assert head.int8_weight.dtype == torch.int8 and head.int8_scale.shape == (2000,)
    logits = head(h)
    # per-row int8 on both sides: errors of ~1/127 of each row's absmax, far below the logit spread
    assert (logits.double() - exact).abs().max() <= 0.05 * exact.abs().max()
    assert (logits.argmax(-1) == exact.argmax(-1)).double().mean() >= 0.9
    assert torch.equal(head(h[5:6]), logits[5:6]) and torch.equal(head(h[:3]), logits[:3])


def test_unknown_head_mode_is_a_clear_error():
    from pybitnet.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown lm_head mode 'fp4'"):
        LMHead(torch.zeros(4, 8), "fp4")


_RUN_TINY = textwrap.dedent("""
    import torch
    from pybitnet import kernels, synthetic
    model = synthetic.random_model("tiny", seed=1)
    logits = model.forward_full(torch.tensor([[1, 2, 3, 4]]), logits="last")
    print(",".join(kernels.available_backends()), int(logits.argmax()))
""")


def _run(env_updates: dict[str, str], script: str = _RUN_TINY, cwd: Path | None = None):
    env = {**os.environ, **env_updates}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_no_compiler_falls_back_with_one_line(tmp_path):
    result = _run({"PATH": str(tmp_path), "CXX": "", "PYBITNET_CACHE": str(tmp_path / "cache"), "PYBITNET_NATIVE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "reference,int8"
    lines = [line for line in result.stderr.splitlines() if line.startswith("pybitnet:")]
    assert len(lines) == 1 and "no C++ compiler" in lines[0]
    forced = _run({"PYBITNET_NATIVE": "0"})
    assert forced.returncode == 0 and forced.stdout.split()[0] == "reference,int8"
    assert result.stdout.split()[1] == forced.stdout.split()[1]


@needs_native
def test_racing_builds_leave_one_whole_library(tmp_path):
    """Two processes build into an empty cache at once (a stand-in compiler that copies the built
    library slowly): both load it, one file remains, no temporary is left behind."""
    assert native.ops() is not None  # the real library, which the stand-in compiler hands out
    built = native.library_path(native._compiler())
    fake = tmp_path / "fake-cxx"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import shutil, sys, time
        if "--version" in sys.argv:
            print("fake-cxx 1.0")
            sys.exit(0)
        out = sys.argv[sys.argv.index("-o") + 1]
        with open({str(built)!r}, "rb") as src, open(out, "wb") as dst:
            data = src.read()
            dst.write(data[: len(data) // 2]); dst.flush(); time.sleep(0.5); dst.write(data[len(data) // 2 :])
    """))
    fake.chmod(0o755)
    env = {**os.environ, "CXX": str(fake), "PYBITNET_CACHE": str(tmp_path / "cache")}
    script = "from pybitnet import native; print(native.ops() is not None)"
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert [out.strip() for out, _ in outputs] == ["True", "True"], outputs
    files = sorted(f.name for f in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].endswith(".so") and ".tmp" not in files[0]


def test_int8_head_selected_at_build_and_load(tmp_path):
    """lm_head="int8" reaches the head from Transformer and pybitnet.load; the rest of the model is unchanged."""
    from rules import assert_float32_rule

    import pybitnet
    from pybitnet.loaders.gguf import write_gguf
    from pybitnet.model import Transformer

    config = pybitnet.preset("tiny")
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    exact = Transformer(config, synthetic.random_weights(config, 4))
    lossy = Transformer(config, synthetic.random_weights(config, 4), lm_head="int8")
    assert exact.lm_head.mode == "exact" and lossy.lm_head.mode == "int8"
    assert torch.equal(next(lossy.hidden_states(tokens))[1], next(exact.hidden_states(tokens))[1])
    assert_float32_rule(lossy.forward_full(tokens), exact.forward_full(tokens))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, exact.export_weights(), "i2_s")
    assert pybitnet.load(path, lm_head="int8").lm_head.mode == "int8"


def test_failed_build_falls_back_with_the_compiler_error(tmp_path):
    """A compiler that rejects the source: one stderr line quoting its error, then the fallback."""
    fake = tmp_path / "broken-cxx"
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    "if '--version' in sys.argv: print('broken-cxx 1'); sys.exit(0)\n"
                    "print('kernels.cpp:1:1: error: no such instruction', file=sys.stderr); print('   ^~~', file=sys.stderr)\n"
                    "sys.exit(1)\n")
    fake.chmod(0o755)
    result = _run({"CXX": str(fake), "PYBITNET_CACHE": str(tmp_path / "cache"), "PYBITNET_NATIVE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "reference,int8"
    lines = [line for line in result.stderr.splitlines() if line.startswith("pybitnet:")]
    assert len(lines) == 1 and "error: no such instruction" in lines[0]
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to load


# ---------------------------------------------------------------------------------------------
# The fused decode ops: BitLinear in one call, decode attention, the int8 head


def _quantize_like_the_docs(x: np.ndarray, norm: np.ndarray | None, row_scale: np.ndarray | None, eps: float):
    """quantize_rows written from its definition (kernels.cpp): float32 steps, the norm's sum of squares
    and factor in float64. x (M, K) float32 rows, or int32 gate|up accumulators (M, 2K)."""
    if x.dtype == np.int32:
        k = x.shape[1] // 2
        gate = np.maximum(x[:, :k].astype(np.float32), np.float32(0))
        x = (gate * gate) * x[:, k:].astype(np.float32)
    k = x.shape[1]
    c = row_scale.astype(np.float32) if row_scale is not None else np.ones(x.shape[0], np.float32)
    t = x * norm if norm is not None else x
    if norm is not None:
        sum_sq = (x.astype(np.float64) ** 2).sum(axis=1)
        factor = (c / np.sqrt(sum_sq / k * c.astype(np.float64) ** 2 + eps)).astype(np.float32)
    else:
        factor = c
    act_scale = np.float32(127) / np.maximum(np.abs(t).max(axis=1) * factor, np.float32(1e-5))
    q = np.clip(np.rint(t * (act_scale * factor)[:, None]), -128, 127).astype(np.int8)
    return q, act_scale[:, None]


@needs_native
@settings(max_examples=30, deadline=None, derandomize=True)
@given(m=st.integers(1, 70), k=st.integers(1, 700), n=st.integers(1, 40), seed=st.integers(0, 2**16),
       relu2=st.booleans(), with_norm=st.booleans(), with_row_scale=st.booleans())
def test_fused_bitlinear_quantizes_and_scales_like_its_definition(m, k, n, seed, relu2, with_norm, with_row_scale):
    """quantize_rows and ternary_linear: the documented integers and scales on every instruction set,
    the reference accumulators, and y = acc * (1/act_scale * β) in float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2000, 2000, (m, 2 * k), generator=g, dtype=torch.int32) if relu2 else \
        torch.randn(m, k, generator=g) * 5
    norm = torch.rand(k, generator=g) + 0.5 if with_norm else None
    row_scale = torch.rand(m, generator=g) * 1e-3 + 1e-6 if with_row_scale else None
    q_ref, scale_ref = _quantize_like_the_docs(x.numpy(), None if norm is None else norm.numpy(),
                                              None if row_scale is None else row_scale.numpy(), 1e-5)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    packed, betas = pack_ternary(w), torch.rand(n, generator=g)
    acc_ref = torch.from_numpy(q_ref).int() @ w.int().t()
    for isa in _isas():
        q, scale = ops.quantize_rows(x, norm, row_scale, 1e-5, native.ISA_IDS[isa])
        assert np.array_equal(q.numpy(), q_ref) and np.array_equal(scale.numpy(), scale_ref), isa
        acc, scale = ops.ternary_linear(x, norm, row_scale, 1e-5, packed, None, native.ISA_IDS[isa])
        assert torch.equal(acc, acc_ref) and np.array_equal(scale.numpy(), scale_ref), isa
        y, _ = ops.ternary_linear(x, norm, row_scale, 1e-5, packed, betas, native.ISA_IDS[isa])
        assert torch.equal(y, acc_ref * (scale.reciprocal() * betas)), isa


def test_fused_bitlinear_full_and_step_paths_agree_bit_for_bit():
    """The unpack + _int_mm path (prefill) and the fused native path (decode) quantize and scale a row
    with the same float32 operations: the same outputs, alone or in a block."""
    if ops is None:
        pytest.skip("native kernels not built (no compiler or PYBITNET_NATIVE=0)")
    from pybitnet.layers import BitLinear, RMSNorm
    from pybitnet.weights import TernaryWeight

    g = torch.Generator().manual_seed(4)
    parts = [TernaryWeight(torch.randint(-1, 2, (48, 300), generator=g, dtype=torch.int8), 0.02),
             TernaryWeight(torch.randint(-1, 2, (16, 300), generator=g, dtype=torch.int8), 0.07)]
    norm = RMSNorm(torch.rand(300, generator=g) + 0.5, 1e-5)
    x = torch.randn(90, 300, generator=g) * 3
    block = [BitLinear(parts, "int8")(x, norm=norm), BitLinear(parts, "native")(x, norm=norm)]
    for a, b in zip(*block):
        assert torch.equal(a, b)
    rows = BitLinear(parts)(x[7:8], norm=norm)  # auto: the native path for one row
    for a, b in zip(rows, block[0]):
        assert torch.equal(a, b[7:8])


@needs_native
@pytest.mark.parametrize("heads,kv_heads,dim", [(20, 5, 128), (4, 2, 16), (6, 6, 10)])
def test_decode_attention_matches_float64_sdpa_and_writes_the_rotated_keys(heads, kv_heads, dim):
    import math

    import torch.nn.functional as F

    from pybitnet.layers import RotaryTables, apply_rope

    g = torch.Generator().manual_seed(heads)
    batch, length = 3, 70
    positions = torch.tensor([69, 0, 33])  # ragged rows, one at the first position
    keys, values = torch.randn(2, batch, kv_heads, length, dim, generator=g)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=g)
    cos, sin = RotaryTables(dim, 10000.0, torch.float32, "cpu", 128).at(positions)  # (B, D)
    split = qkv.view(batch, 1, heads + 2 * kv_heads, dim)
    q = apply_rope(split[:, :, :heads], cos[:, None, None], sin[:, None, None])
    k = apply_rope(split[:, :, heads : heads + kv_heads], cos[:, None, None], sin[:, None, None])
    expected_keys, expected_values = keys.clone(), values.clone()
    rows = torch.arange(batch)
    expected_keys[rows, :, positions] = k[:, 0]
    expected_values[rows, :, positions] = split[:, 0, heads + kv_heads :]
    for isa in _isas():
        got_keys, got_values = keys.clone(), values.clone()
        out = ops.attention_decode(qkv, cos, sin, got_keys, got_values, positions, heads, kv_heads,
                                   1 / math.sqrt(dim), native.ISA_IDS[isa])
        assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values), isa
        for b in range(batch):
            seen = int(positions[b]) + 1
            ref = F.scaled_dot_product_attention(
                q[b : b + 1].transpose(1, 2).double(), expected_keys[b : b + 1, :, :seen].double(),
                expected_values[b : b + 1, :, :seen].double(), enable_gqa=True, scale=1 / math.sqrt(dim))
            assert (out[b].double() - ref.reshape(-1)).abs().max() < 1e-5, (isa, b)
            alone = ops.attention_decode(qkv[b : b + 1], cos[b : b + 1], sin[b : b + 1], keys[b : b + 1].clone(),
                                         values[b : b + 1].clone(), positions[b : b + 1], heads, kv_heads,
                                         1 / math.sqrt(dim), native.ISA_IDS[isa])
            assert torch.equal(alone[0], out[b]), (isa, b)  # a row's output ignores the rest of the batch


@needs_native
def test_decode_attention_refuses_a_position_outside_the_cache():
    keys = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.attention_decode(torch.zeros(1, 24), torch.ones(1, 8), torch.zeros(1, 8), keys, keys.clone(),
                             torch.tensor([4]), 1, 1, 1.0, 0)


@needs_native
def test_native_int8_head_gives_the_torch_formula_bit_for_bit(monkeypatch):
    from pybitnet.quant.activations import quantize_activations

    g = torch.Generator().manual_seed(9)
    head = LMHead((torch.randn(777, 200, generator=g) * 0.05).bfloat16(), "int8")
    h = torch.randn(10, 200, generator=g)
    q, act_scale = quantize_activations(h, as_int8=True)
    expected = (q.int() @ head.int8_weight.int().t()).float() * (head.int8_scale / act_scale)
    for isa in _isas():
        got = ops.int8_head(h, head.int8_weight, head.int8_scale, head.int8_sum, native.ISA_IDS[isa])
        assert torch.equal(got, expected), isa
    assert torch.equal(head(h), expected)
    monkeypatch.setenv("PYBITNET_NATIVE_ISA", "avx2")  # no VNNI: the torch path, the same numbers
    assert torch.equal(head(h), expected)


# ---------------------------------------------------------------------------------------------
# The decode step of the whole stack in one native call


def _decode_logits(model, tokens: torch.Tensor, mask: torch.Tensor, steps: int):
    """Prefill a ragged batch, then decode `steps` tokens: logits (steps, B, V) and the cache."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + steps)
    model.prefill(tokens, cache, attention_mask=mask)
    out = [model.decode_step(tokens[:, t], cache) for t in range(steps)]
    return torch.stack(out), cache


@needs_native
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "auto"])
@pytest.mark.parametrize("sub_norms,ragged", [(True, True), (False, True), (True, False)])
def test_decode_stack_gives_the_layer_by_layer_bits(monkeypatch, isa, sub_norms, ragged):
    """One decode_stack call per step (the default on this path) against the same model running its
    blocks one by one: identical logits and caches, ragged rows or rows at one length, every
    instruction set."""
    import pybitnet
    from pybitnet.layers import DecodeStack
    from pybitnet.model import Transformer

    if isa not in ("auto", "scalar") and isa not in _isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("PYBITNET_NATIVE_ISA", isa)
    config = pybitnet.preset("tiny").replace(num_layers=3, sub_norms=sub_norms)
    model = Transformer(config, synthetic.random_weights(config, 11))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, config.vocab_size, (3, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 7 + [0] * 2]) if ragged else torch.ones(3, 9, dtype=torch.long)
    runs = []
    original = DecodeStack.run
    monkeypatch.setattr(DecodeStack, "run", lambda self, *a: runs.append(1) or original(self, *a))
    stacked, stacked_cache = _decode_logits(model, tokens, mask, 6)
    assert len(runs) == 6  # every step ran as one call
    monkeypatch.setattr(DecodeStack, "plan", lambda self, *a: None)  # the blocks one by one
    layered, layered_cache = _decode_logits(model, tokens, mask, 6)
    assert len(runs) == 6
    assert torch.equal(stacked, layered)
    assert torch.equal(stacked_cache.keys, layered_cache.keys) and torch.equal(stacked_cache.values, layered_cache.values)


def _plan(model, rows: int = 2):
    cache = model.new_cache(rows, 4)
    cache.lengths.fill_(1)
    windows, positions = cache.windows(1)
    h = model._embed(torch.full((rows, 1), 3))
    return model._decode_stack.plan(h, windows, model._mask(positions, windows[0].length))


@needs_native
def test_decode_stack_stays_out_where_it_does_not_apply():
    """SiLU FFNs, float64 models, a backend other than native, and more rows than the native backend
    takes decode block by block."""
    import pybitnet
    from pybitnet.model import Transformer

    config = pybitnet.preset("tiny")
    assert _plan(Transformer(config.replace(hidden_act="silu"), synthetic.random_weights(config, 1))) is None
    assert _plan(Transformer(config, synthetic.random_weights(config, 1), dtype=torch.float64)) is None
    model = Transformer(config, synthetic.random_weights(config, 1))
    assert _plan(model) is not None
    assert _plan(model, rows=kernels.NATIVE_MAX_ROWS + 1) is None
    for backend in ("int8", "reference"):
        model.set_backend(backend)
        assert _plan(model) is None, backend
    model.set_backend("auto")
    assert _plan(model) is not None
    model.layers[1].ffn.down.backend = "reference"  # one projection changed directly
    assert _plan(model) is None


@needs_native
def test_decode_stack_follows_replaced_weights():
    """A projection's weights, a norm's weight or a whole block replaced after the first step: the next
    step runs the new ones (the same logits as the blocks one by one), never the gathered ones."""
    import pybitnet
    from pybitnet.layers import DecodeStack
    from pybitnet.model import Transformer

    config = pybitnet.preset("tiny").replace(num_layers=3)
    model = Transformer(config, synthetic.random_weights(config, 2))
    other = Transformer(config, synthetic.random_weights(config, 3))
    tokens = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    before, _ = _decode_logits(model, tokens, mask, 2)
    changes = [lambda: setattr(model.layers[0].ffn.down, "ternary_weights", other.layers[0].ffn.down.ternary_weights),
               lambda: setattr(model.layers[1].attention.sub_norm, "weight", other.layers[1].attention.sub_norm.weight),
               lambda: model.layers.__setitem__(2, other.layers[2])]
    for change in changes:
        change()
        stacked, _ = _decode_logits(model, tokens, mask, 2)
        plan = DecodeStack.plan
        DecodeStack.plan = lambda self, *a: None
        try:
            layered, _ = _decode_logits(model, tokens, mask, 2)
        finally:
            DecodeStack.plan = plan
        assert torch.equal(stacked, layered) and not torch.equal(stacked, before)
        before = stacked


@needs_native
def test_decode_stack_names_a_missing_weight():
    keys = [torch.zeros(1, 1, 4, 8)]
    weights = [torch.ones(8)] + [None] * 10
    with pytest.raises(RuntimeError, match=r"(qkv|o_proj|gate_up|down|column scale|ffn_norm) of layer 0 is missing"):
        ops.decode_stack(torch.zeros(1, 8), weights, [1.0, 1.0], 1e-5, torch.ones(1, 8), torch.zeros(1, 8), keys,
                         [keys[0].clone()], torch.tensor([0]), 1, 1, 1.0, 0)
    with pytest.raises(RuntimeError, match="got 11 weights, 1 betas, 1 key and 1 value caches"):
        ops.decode_stack(torch.zeros(1, 8), weights, [1.0], 1e-5, torch.ones(1, 8), torch.zeros(1, 8), keys,
                         [keys[0].clone()], torch.tensor([0]), 1, 1, 1.0, 0)
    with pytest.raises(RuntimeError, match="at least one layer"):
        ops.decode_stack(torch.zeros(1, 8), [], [], 1e-5, torch.ones(1, 8), torch.zeros(1, 8), [], [],
                         torch.tensor([0]), 1, 1, 1.0, 0)
