"""GGUF embedding / output tables in Q8_0, Q4_0, Q6_K, Q5_K and Q4_K kept as stored (quant/ggml_blocks.py):
the block layouts against gguf-py's dequantize and quantizer and llama.cpp's quantizer, the native head
against the fallback on every instruction set, lm_head="int8" on the blocks,
logits against a float64 reference over the dequantized table, decode batch invariance, the loader,
and `pybitnet convert --embed-type`."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pybitnet
from pybitnet import native, preset, synthetic
from pybitnet.cli import app
from pybitnet.head import LM_HEAD_ROWS, LMHead
from pybitnet.loaders import convert
from pybitnet.loaders.gguf import load_gguf_weights, write_gguf
from pybitnet.loaders.gguf_file import TYPE_BY_NAME, GGUFReader, TensorSpec, write_gguf_file
from pybitnet.loaders.hf import save_hf
from pybitnet.quant.ggml_blocks import BLOCKS, NATIVE_KIND, QuantizedTable, dequantize_rows, quantize_rows
from reference_numpy import ReferenceModel
from rules import assert_float32_rule, assert_float64_rule

ops = native.ops()
needs_native = pytest.mark.skipif(ops is None, reason="native kernels not built (no compiler or PYBITNET_NATIVE=0)")
KINDS = ("Q8_0", "Q6_K", "Q4_K", "Q5_K", "Q4_0")
# bytes per block, and where each block's f16 scales (d, then dmin) are: ggml's block_* structs
BLOCK_BYTES = {"Q8_0": 34, "Q6_K": 210, "Q4_K": 144, "Q5_K": 176, "Q4_0": 18}
SCALE_OFFSETS = {"Q8_0": (0,), "Q6_K": (208,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q4_0": (0,)}
# rows of 256 elements: a whole Q6_K super-block; vocab above LM_HEAD_ROWS so the fallback tiles
CONFIG = preset("tiny").replace(hidden_size=256, intermediate_size=512, head_dim=0, vocab_size=LM_HEAD_ROWS + 300,
                                max_position_embeddings=256)


def _isas() -> list[str]:
    if ops is None:
        return []
    features = int(ops.cpu_features())
    return ["scalar"] + (["avx2"] if features & native.HAS_AVX2 else []) + \
        (["avx512"] if features & native.HAS_AVX512_VNNI else [])


def _table_values(seed: int, rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x[1] = 0  # all-zero blocks and groups
    x[2, :16] = 0
    x[3, 5] = 4.0  # one outlier in a block
    x[4] *= np.float32(1e-6)  # tiny scales
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_match_gguf_py_dequantize(kind: str):
    x = _table_values(0, 40, 512)
    data = quantize_rows(x, kind)
    assert data.shape == (40, 512 // BLOCKS[kind][0] * BLOCKS[kind][1])
    ours = dequantize_rows(torch.from_numpy(data), kind, 512).numpy()
    reference = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind))
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))  # the same float32 bits
    step = np.abs(x).max(axis=1, keepdims=True) / {"Q8_0": 127, "Q6_K": 24, "Q4_K": 6, "Q5_K": 12, "Q4_0": 8}[kind]
    assert (np.abs(ours - x) <= step + 1e-6).all()  # a quantization, not garbage (f16 scales flush tiny rows)


def _random_blocks(kind: str, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random bytes with finite f16 scales of either sign (subnormals and zeros too): every code, bit and
    packed scale a valid file can hold, not only those a quantizer writes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks_per_row, BLOCK_BYTES[kind]), dtype=np.uint8)
    for offset in SCALE_OFFSETS[kind]:
        bits = rng.integers(0, 2**16, (rows, blocks_per_row), dtype=np.uint16)
        bits &= ~np.uint16(0x4000)  # exponent fields below 16: finite, magnitudes below 2
        bits[:, 0] = 0x8000  # -0
        bits[:, 1] = 0x0001  # the smallest subnormal
        data[..., offset : offset + 2] = bits[..., None].view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_random_blocks_dequantize_as_gguf_py_does(kind: str):
    per_block = 32 if kind in ("Q8_0", "Q4_0") else 256
    data = _random_blocks(kind, 24, 4, seed=7)
    ours = dequantize_rows(torch.from_numpy(data), kind, 4 * per_block).numpy()
    reference = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind))
    assert np.isfinite(reference).all()
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))
    # and a table reads the same rows, one at a time or all at once
    table = QuantizedTable(torch.from_numpy(data), kind, 4 * per_block)
    assert torch.equal(table[torch.tensor([[5, 0], [23, 5]])][1, 1], torch.from_numpy(reference[5]))
    assert torch.equal(table.dequantize(), torch.from_numpy(reference))


def test_q4_0_quantizer_writes_what_gguf_py_writes():
    x = _table_values(3, 40, 512)
    x[5, 64:96] = np.abs(x[5, 64:96]).max()  # a block whose values tie in magnitude: the first sets d's sign
    x[5, 64] = -x[5, 64]
    assert np.array_equal(quantize_rows(x, "Q4_0"), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0))


def test_q4_0_block_of_zeros_has_the_scale_ggml_gives_it():
    """ggml keeps max = +0 through a block of zeros, so d = +0 / -8 = -0 even when the first zero is -0
    (gguf-py takes that -0 and writes +0); the codes are all 8 (value 0)."""
    x = np.zeros((2, 32), np.float32)
    x[1, 0] = -0.0
    data = quantize_rows(x, "Q4_0")
    assert np.array_equal(data[:, :2], np.array([[0x00, 0x80]] * 2, np.uint8))  # f16 -0, little-endian
    assert (data[:, 2:] == 0x88).all()


def test_q6_k_bytes_per_value():
    table = QuantizedTable.quantize(torch.from_numpy(_table_values(1, 8, 1024)), "Q6_K")
    assert table.nbytes / (8 * 1024) == 210 / 256  # 0.82 bytes per value


def test_a_loaded_q6_k_table_stays_in_the_mapping(tmp_path: Path):
    """Loading maps the blocks instead of copying them (nor widening them to float32): measured in a fresh
    process, RSS grows by the pages read: a few for an embedding lookup, every block for a head call."""
    import subprocess
    import sys
    import textwrap

    config = CONFIG.replace(vocab_size=32768, hidden_size=1024, intermediate_size=256, num_layers=1)
    blocks = np.random.default_rng(0).integers(0, 256, (config.vocab_size, 4 * 210), dtype=np.uint8)
    blocks.reshape(config.vocab_size, 4, 210)[..., 208:] = np.array([1e-3], dtype=np.float16).view(np.uint8)
    table_bytes = blocks.nbytes  # 27 MiB as Q6_K, 128 MiB as float32
    script = textwrap.dedent("""
        import sys, torch, pybitnet
        def rss():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
        torch.zeros(8, 8) @ torch.zeros(8, 8)  # library pages a first matmul and the native library map
        pybitnet.native.ops()
        before = rss()
        model = pybitnet.load(sys.argv[1])
        loaded = rss() - before
        model.embed_tokens[torch.tensor([1, 2, 3])]
        looked_up = rss() - before
        model.lm_head(torch.zeros(1, model.config.hidden_size))
        print(loaded, looked_up, rss() - before, int(model.embed_tokens.data.is_shared() or 0))
    """)
    for tied in (False, True):
        weights = synthetic.random_weights(config.replace(tie_word_embeddings=tied), 0)
        weights["embed_tokens"] = QuantizedTable(torch.from_numpy(blocks), "Q6_K", config.hidden_size)
        if not tied:
            weights["lm_head"] = QuantizedTable(torch.from_numpy(blocks[::-1].copy()), "Q6_K", config.hidden_size)
        path = tmp_path / f"q6_k-{tied}.gguf"
        write_gguf(path, config.replace(tie_word_embeddings=tied), weights, "i2_s", embed_type="q6_k")
        out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
        loaded, looked_up, after_head, _ = map(int, out.stdout.split()[-4:])
        print(f"\ntied={tied}: RSS +{loaded / 2**20:.1f} MiB loaded, +{looked_up / 2**20:.1f} after a lookup, "
              f"+{after_head / 2**20:.1f} after a head call (table {table_bytes / 2**20:.1f} MiB)")
        # a copy of either table would add table_bytes; the tables together are twice that
        assert loaded < table_bytes / 2, "loading copied a table"
        assert looked_up - loaded < table_bytes / 8, "a lookup of 3 rows brought in the table"
        assert after_head - looked_up > table_bytes / 2, "the head did not read its table from the mapping"


@pytest.mark.parametrize("kind", KINDS)
def test_quantizers_write_what_llama_cpp_writes(kind: str, tmp_path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    config = CONFIG.replace(vocab_size=512)
    weights = synthetic.random_weights(config, 0)
    table = weights["embed_tokens"]
    table[1] = -0.0  # a row of zeros whose first zero is negative
    table[2, :48] = 0  # zero blocks and groups beside live ones
    table[3, 5] = 1.0  # one outlier
    table[4, 32:64] = table[4, 32:64].abs().neg()  # a block of negative values only: no positive code range
    write_gguf(tmp_path / "f32.gguf", config, weights, "f16", embed_type="f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_F16)  # the F16 projections stay; only the embedding changes
    params.token_embedding_type = int(getattr(gguf.GGMLQuantizationType, kind))
    params.nthread = 1
    out = tmp_path / "llama.gguf"
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    with GGUFReader(out) as reader:
        info = reader.tensors["token_embd.weight"]
        assert info.type.name == kind
        theirs = reader.tensor_bytes(info).reshape(512, -1).copy()
    assert np.array_equal(quantize_rows(weights["embed_tokens"].float(), kind), theirs)


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_native_head_equals_fallback_on_every_instruction_set(kind: str, monkeypatch):
    cols = 480 if kind in ("Q8_0", "Q4_0") else 512  # blocks of 32: rows not a multiple of 64
    table = QuantizedTable.quantize(torch.from_numpy(_table_values(2, LM_HEAD_ROWS + 77, cols)), kind)
    head = LMHead(table)
    h = torch.randn(9, cols, generator=torch.Generator().manual_seed(3))
    values = table.dequantize(torch.float64)
    exact = h.double() @ values.t()
    bound = cols * 2.0**-23 * (h.double().abs() @ values.abs().t())  # float32 rounding of any summation order
    monkeypatch.setenv("PYBITNET_NATIVE", "0")
    fallback = head._widened_logits(h)
    assert ((fallback.double() - exact).abs() <= bound).all()
    first = None
    for isa in _isas():
        monkeypatch.setenv("PYBITNET_NATIVE_ISA", isa)
        logits = head(h)
        assert ((logits.double() - exact).abs() <= bound).all(), isa
        assert ((logits.double() - fallback.double()).abs() <= 2 * bound).all(), isa
        if first is None:
            first = logits
        assert torch.equal(logits, first), isa  # one summation order in every body
        for rows in (slice(0, 1), slice(4, 5), slice(2, 8)):
            assert torch.equal(head(h[rows]), logits[rows]), isa  # row independent
        direct = ops.quant_head(h, table.data, NATIVE_KIND[kind], {"scalar": 1, "avx2": 2, "avx512": 3}[isa])
        assert torch.equal(direct, logits)


@needs_native
@pytest.mark.parametrize("kind, cols", [(kind, 512) for kind in KINDS] + [("Q8_0", 576), ("Q4_0", 576)])
def test_int8_head_runs_on_the_blocks_with_one_summation_order(kind: str, cols: int, monkeypatch):
    """lm_head="int8" over a block table: int8 activations against the blocks themselves (no copy), the
    dot product of the activations' integers with the dequantized values over act_scale, the same bits
    in every body and alone or in any batch. 576 columns: an odd number of 64-element chunks."""
    from pybitnet.quant.activations import quantize_activations

    table = QuantizedTable.quantize(torch.from_numpy(_table_values(4, LM_HEAD_ROWS + 77, cols)), kind)
    head = LMHead(table, "int8")
    assert not hasattr(head, "int8_weight")  # no second copy of the table
    h = torch.randn(9, cols, generator=torch.Generator().manual_seed(5))
    h[3] *= 1e-3
    q, act_scale = quantize_activations(h)
    values = table.dequantize(torch.float64)
    exact = (q.double() @ values.t()) / act_scale.double()
    bound = cols * 2.0**-22 * ((q.double().abs() @ values.abs().t()) / act_scale.double())
    monkeypatch.setenv("PYBITNET_NATIVE_ISA", "scalar")  # no VNNI: the torch path over dequantized tiles
    assert not head.row_independent(torch.float32)
    fallback = head(h)
    assert ((fallback.double() - exact).abs() <= bound).all()
    first = None
    for isa in _isas():
        monkeypatch.setenv("PYBITNET_NATIVE_ISA", isa)
        logits = ops.quant_head_int8(h, table.data, NATIVE_KIND[kind], {"scalar": 1, "avx2": 2, "avx512": 3}[isa])
        assert ((logits.double() - exact).abs() <= bound).all(), isa
        first = logits if first is None else first
        assert torch.equal(logits, first), isa
        for rows in (slice(0, 1), slice(3, 4), slice(2, 8)):
            assert torch.equal(ops.quant_head_int8(h[rows], table.data, NATIVE_KIND[kind], 0), first[rows])
    monkeypatch.setenv("PYBITNET_NATIVE_ISA", "auto")
    if native.has_avx512_vnni():
        assert head.row_independent(torch.float32)
        assert torch.equal(head(h), first)


def _write(tmp_path: Path, kind: str, tied: bool, qtype: str = "i2_s") -> tuple[Path, dict]:
    config = CONFIG.replace(tie_word_embeddings=tied)
    weights = synthetic.random_weights(config, 5, embed_dtype=torch.float32)
    path = tmp_path / f"{kind}-{'tied' if tied else 'untied'}.gguf"
    write_gguf(path, config, weights, qtype, embed_type=kind.lower())
    return path, weights


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_a_float64_reference_over_the_dequantized_table(kind: str, tied: bool, tmp_path: Path):
    path, weights = _write(tmp_path, kind, tied)
    config, loaded = load_gguf_weights(path)
    names = ["embed_tokens"] + ([] if tied else ["lm_head"])
    for name in names:
        assert isinstance(loaded[name], QuantizedTable) and loaded[name].type_name == kind
    # the reference reads the HF twin whose tables are gguf-py's dequantization of the file's blocks
    with GGUFReader(path) as reader:
        tables = {name: gguf.quants.dequantize(reader.tensor_bytes(reader.tensors[gguf_name]).reshape(config.vocab_size, -1),
                                               getattr(gguf.GGMLQuantizationType, kind))
                  for name, gguf_name in (("embed_tokens", "token_embd.weight"), ("lm_head", "output.weight"))
                  if name in names}
    twin = dict(weights, **{name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in tables.items()})
    reference = ReferenceModel.from_hf_dir(save_hf(tmp_path / "hf", config, twin, float_dtype=torch.float32))
    ours64 = pybitnet.load(path, dtype=torch.float64)
    ours32 = pybitnet.load(path)
    assert isinstance(ours64.embed_tokens, QuantizedTable) and (ours64.lm_head.weight is ours64.embed_tokens) == tied
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(np.stack([reference.forward(row.tolist()) for row in tokens]))  # (2, T, V)
    assert_float64_rule(ours64.forward_full(tokens), expected)
    assert_float32_rule(ours32.forward_full(tokens), expected)
    assert_float64_rule(ours64.forward_step_by_step(tokens), expected)


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_decode_gives_a_row_the_same_bits_in_any_batch(kind: str, tmp_path: Path, one_thread):
    path, _ = _write(tmp_path, kind, tied=kind == "Q6_K")
    model = pybitnet.load(path)
    assert isinstance(model.lm_head.weight, QuantizedTable) and model.decode_is_row_independent()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, CONFIG.vocab_size, (8, 6), generator=g)
    lengths = [6, 3, 5, 2, 6, 4, 1, 5]
    following = torch.randint(0, CONFIG.vocab_size, (8,), generator=g)

    def decode(rows: list[int]) -> torch.Tensor:
        cache = model.new_cache(batch_size=len(rows), max_len=16)
        for slot, row in enumerate(rows):
            alone = model.new_cache(batch_size=1, max_len=16)
            model.prefill(prompts[row : row + 1, : lengths[row]], alone)
            cache.copy_rows(alone, [0], [slot])
        return model.decode_step(following[rows], cache)

    alone = {row: decode([row])[0] for row in range(8)}
    for size in range(1, 9):
        batch = decode(list(range(size)))
        for row in range(size):
            assert torch.equal(batch[row], alone[row]), (size, row)


def test_int8_head_mode_takes_a_quantized_table(tmp_path: Path):
    path, _ = _write(tmp_path, "Q6_K", tied=True)
    exact, int8 = pybitnet.load(path), pybitnet.load(path, lm_head="int8")
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    assert_float32_rule(int8.forward_full(tokens), exact.forward_full(tokens))


def test_other_block_types_load_dequantized_with_one_line(tmp_path: Path, capsys):
    path, _ = _write(tmp_path, "Q8_0", tied=True)
    q5_0 = tmp_path / "q5_0.gguf"
    rng = np.random.default_rng(0)
    with GGUFReader(path) as reader:  # the same file with a Q5_0 token_embd of random blocks
        specs = []
        for info in reader.tensors.values():
            if info.name == "token_embd.weight":  # 8 blocks of 22 bytes a row: f16 d, qh[4], qs[16]
                blocks = rng.integers(0, 256, (CONFIG.vocab_size, 8, 22), dtype=np.uint8)
                blocks[..., 0:2] = np.array([0.01], dtype=np.float16).view(np.uint8)
                blocks = blocks.reshape(CONFIG.vocab_size, -1)
                specs.append(TensorSpec(info.name, info.shape, TYPE_BY_NAME["Q5_0"], lambda b=blocks: b))
            else:
                specs.append(TensorSpec(info.name, info.shape, info.type, lambda i=info: reader.tensor_bytes(i).copy()))
        write_gguf_file(q5_0, reader.fields, specs)
    capsys.readouterr()
    _, weights = load_gguf_weights(q5_0)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "token_embd.weight is Q5_0, loaded dequantized to float32" in lines[0]
    assert weights["embed_tokens"].dtype == torch.float32
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q5_0)
    assert np.array_equal(weights["embed_tokens"].numpy(), expected)


runner = CliRunner()


@pytest.mark.parametrize("tied", [True, False])
def test_convert_round_trip(tmp_path: Path, tied: bool):
    source, weights = _write(tmp_path, "Q8_0", tied, qtype="i2_s")
    q6 = tmp_path / "q6.gguf"
    result = runner.invoke(app, ["convert", str(source), str(q6), "--embed-type", "q6_k"])
    assert result.exit_code == 0, result.output
    _, loaded = load_gguf_weights(q6)
    names = ["embed_tokens"] + ([] if tied else ["lm_head"])
    for name in names:  # Q8_0 values requantized to Q6_K as llama.cpp would
        table = loaded[name]
        assert isinstance(table, QuantizedTable) and table.type_name == "Q6_K"
        expected = quantize_rows(QuantizedTable.quantize(weights[name], "Q8_0").dequantize(), "Q6_K")
        assert np.array_equal(table.data.numpy(), expected)
    again = convert(q6, tmp_path / "again.gguf", qtype="tq2_0", embed_type="q6_k")  # kept as stored: same bytes
    _, reloaded = load_gguf_weights(again)
    for name in names:
        assert torch.equal(reloaded[name].data, loaded[name].data)
    f16 = convert(q6, tmp_path / "f16.gguf", embed_type="f16")
    _, widened = load_gguf_weights(f16)
    for name in names:
        assert torch.equal(widened[name], loaded[name].dequantize().half())
    hf = convert(q6, tmp_path / "hf")  # a Hugging Face directory gets the float32 values
    model, hf_model = pybitnet.load(q6), pybitnet.load(hf)
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    assert_float32_rule(model.forward_full(tokens), hf_model.forward_full(tokens))  # two head kernels, one table


@pytest.mark.parametrize("kind", ["Q5_K", "Q4_0"])
def test_convert_writes_q5_k_and_q4_0(tmp_path: Path, kind: str):
    source, weights = _write(tmp_path, "Q8_0", tied=False)
    out = tmp_path / f"{kind}.gguf"
    result = runner.invoke(app, ["convert", str(source), str(out), "--embed-type", kind.lower()])
    assert result.exit_code == 0, result.output
    with GGUFReader(out) as reader:
        assert reader.tensors["token_embd.weight"].type.name == kind
        assert reader.tensors["output.weight"].type.name == kind
    _, loaded = load_gguf_weights(out)
    for name in ("embed_tokens", "lm_head"):  # the Q8_0 values, requantized
        table = loaded[name]
        assert isinstance(table, QuantizedTable) and table.type_name == kind
        expected = quantize_rows(QuantizedTable.quantize(weights[name], "Q8_0").dequantize(), kind)
        assert np.array_equal(table.data.numpy(), expected)


def test_a_model_with_a_block_table_exports_its_values(tmp_path: Path):
    path, _ = _write(tmp_path, "Q6_K", tied=False)
    model = pybitnet.load(path)
    exported = model.export_weights()
    assert isinstance(exported["embed_tokens"], QuantizedTable) and isinstance(exported["lm_head"], QuantizedTable)
    hf = save_hf(tmp_path / "hf", model.config, exported, float_dtype=torch.float32)
    again = pybitnet.load(hf)
    assert torch.equal(again.embed_tokens, model.embed_tokens.dequantize())
    assert torch.equal(again.lm_head.weight, model.lm_head.weight.dequantize())


def test_convert_refuses_rows_that_are_not_whole_blocks(tmp_path: Path, cli):
    result = cli("convert", "synthetic:tiny", str(tmp_path / "t.gguf"), "--embed-type", "q6_k")
    assert result.code == 1 and "rows of 128 elements, not a multiple of 256" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "t.gguf").exists()
    result = runner.invoke(app, ["convert", "synthetic:tiny", str(tmp_path / "t.gguf"), "--embed-type", "q8_0"])
    assert result.exit_code == 0, result.output
    assert isinstance(load_gguf_weights(tmp_path / "t.gguf")[1]["embed_tokens"], QuantizedTable)
    shown = cli("info", str(tmp_path / "t.gguf"))
    assert shown.code == 0 and "Q8_0" in shown.out


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_runs_our_quantized_tables(kind: str, tmp_path: Path):
    """llama.cpp loads a file we write with a Q8_0 / Q6_K embedding and its logits meet the float32 rule
    against ours (it quantizes activations per block and runs its own dot products). Tied only: this
    llama.cpp's `bitnet` graph never reads an `output` tensor, and refuses a file that has one whatever its type."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    config = CONFIG.replace(vocab_size=512, hidden_act="silu")  # llama.cpp's bitnet graph is SiLU; tied
    path = tmp_path / "m.gguf"
    write_gguf(path, config, synthetic.random_weights(config, 0), "tq2_0", embed_type=kind.lower())
    model = pybitnet.load(path)
    assert isinstance(model.lm_head.weight, QuantizedTable)
    tokens = torch.randint(0, config.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)
    try:
        assert llm.n_vocab() == config.vocab_size
        llm.eval(tokens)
        theirs = torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float64))
    finally:
        llm.close()
    rel, agree = assert_float32_rule(theirs, model.forward_full(torch.tensor([tokens]))[0])
    print(f"\nllama.cpp vs pybitnet ({kind}): max relative difference {rel:.2e}, top-1 {agree:.1%}")


@pytest.mark.parametrize("kind, offset, value", [("Q8_0", 0, np.inf), ("Q4_0", 0, np.nan), ("Q6_K", 208, -np.inf),
                                                ("Q4_K", 2, np.nan), ("Q5_K", 0, np.inf), ("Q5_K", 2, np.nan)])
def test_a_table_with_a_non_finite_scale_is_refused(tmp_path: Path, kind: str, offset: int, value: float):
    """A non-finite d (offset 0, or Q6_K's at the end of its block) or dmin (offset 2) in block 3."""
    from pybitnet.errors import CheckpointError

    path, _ = _write(tmp_path, kind, tied=True)
    with GGUFReader(path) as reader:
        start = reader.tensors["token_embd.weight"].data_offset + BLOCK_BYTES[kind] * 3 + offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 2] = np.array([value], dtype=np.float16).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="token_embd.weight.*non-finite"):
        load_gguf_weights(path)

