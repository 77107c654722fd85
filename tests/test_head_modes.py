"""lm_head modes chosen at load (head.py): q8_0 / q6_k / q4_k quantize a float output table (HF safetensors,
GGUF F16 / BF16 / F32) to ggml's blocks and keep only the blocks, a tied embedding sharing them; the int8
head; and what loading costs in memory (no float32 copy of a table, at any point)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import pybitnet
from pybitnet import CheckpointError, ConfigError, preset, synthetic
from pybitnet.cli import app
from pybitnet.head import HEAD_MODES, QUANTIZE_ROWS, LMHead, quantize_rows_int8
from pybitnet.loaders.gguf import load_gguf_weights, write_gguf
from pybitnet.loaders.gguf_file import GGUFReader
from pybitnet.loaders.hf import load_hf_weights, save_hf
from pybitnet.model import Transformer
from pybitnet.quant.ggml_blocks import BLOCKS, QuantizedTable, quantize_rows
from reference_numpy import ReferenceModel
from rules import assert_float32_rule, assert_float64_rule

MODES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k": "Q5_K", "q4_k": "Q4_K", "q4_0": "Q4_0"}
# rows of 256 values (whole Q6_K / Q4_K super-blocks); a vocabulary of several quantization chunks and a partial one
CONFIG = preset("tiny").replace(hidden_size=256, intermediate_size=512, head_dim=0, vocab_size=2 * QUANTIZE_ROWS + 77,
                                max_position_embeddings=64)
runner = CliRunner()


def _hf(tmp_path: Path, tied: bool, seed: int = 3) -> tuple[Path, dict]:
    """A tiny HF checkpoint in the packed layout with bf16 tables, as the 2B-4T repo stores them."""
    config = CONFIG.replace(tie_word_embeddings=tied)
    weights = synthetic.random_weights(config, seed)
    return save_hf(tmp_path / f"hf-{'tied' if tied else 'untied'}", config, weights), weights


def _head_name(tied: bool) -> str:
    return "embed_tokens" if tied else "lm_head"


def _float_tensors(model: Transformer) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_floating_point() and tuple(t.shape) == (CONFIG.vocab_size, CONFIG.hidden_size)]


@pytest.mark.parametrize(("mode", "tied"), [("q8_0", True), ("q6_k", True), ("q5_k", True), ("q4_k", True), ("q4_0", True), ("q6_k", False)])
def test_logits_equal_a_float64_reference_over_the_dequantized_table(mode: str, tied: bool, tmp_path: Path):
    path, weights = _hf(tmp_path, tied)
    ours64 = pybitnet.load(path, dtype=torch.float64, lm_head=mode)
    ours32 = pybitnet.load(path, lm_head=mode)
    table = ours64.lm_head.weight
    assert isinstance(table, QuantizedTable) and table.type_name == MODES[mode]
    # the blocks are quantize_rows of the file's float table, all of it at once
    stored = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert stored.dtype == torch.bfloat16
    assert np.array_equal(table.data.numpy(), quantize_rows(stored.float().numpy(), MODES[mode]))
    assert table.nbytes == CONFIG.vocab_size * CONFIG.hidden_size // BLOCKS[MODES[mode]][0] * BLOCKS[MODES[mode]][1]
    # the model holds the blocks, not the float table (an untied model's embedding stays float)
    assert _float_tensors(ours32) == ([] if tied else [("embed_tokens", (CONFIG.vocab_size, CONFIG.hidden_size))])
    # the reference: gguf-py's dequantization of the model's blocks, in an HF twin read by the numpy model
    values = gguf.quants.dequantize(table.data.numpy(), getattr(gguf.GGMLQuantizationType, MODES[mode]))
    _, stored, _ = load_hf_weights(path)  # the file's values (bf16 norms and tables)
    twin = {name: (w.float() if isinstance(w, torch.Tensor) else w) for name, w in stored.items()}
    twin[_head_name(tied)] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    reference = ReferenceModel.from_hf_dir(save_hf(tmp_path / "twin", ours64.config, twin, float_dtype=torch.float32))
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(np.stack([reference.forward(row.tolist()) for row in tokens]))  # (2, T, V)
    assert_float64_rule(ours64.forward_full(tokens), expected)
    assert_float64_rule(ours64.forward_step_by_step(tokens), expected)
    assert_float32_rule(ours32.forward_full(tokens), expected)
    # quantizing really happened: the float table's own logits are not these
    float_model = pybitnet.load(path, dtype=torch.float64)
    assert not torch.allclose(float_model.forward_full(tokens), ours64.forward_full(tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("embed_type", "tied", "mode"), [("f16", True, "q6_k"), ("bf16", False, "q8_0"),
                                                      ("f32", True, "q4_k")])
def test_a_float_gguf_table_is_quantized_as_its_rows_are_read(embed_type: str, tied: bool, mode: str, tmp_path: Path):
    config = CONFIG.replace(tie_word_embeddings=tied)
    path = tmp_path / f"{embed_type}.gguf"
    write_gguf(path, config, synthetic.random_weights(config, 4, embed_dtype=torch.float32), "i2_s",
               embed_type=embed_type)
    _, exact = load_gguf_weights(path)
    _, weights = load_gguf_weights(path, lm_head=mode)
    head = _head_name(tied)
    assert isinstance(weights[head], QuantizedTable) and weights[head].type_name == MODES[mode]
    assert np.array_equal(weights[head].data.numpy(), quantize_rows(exact[head].float().numpy(), MODES[mode]))
    if not tied:  # only the table the head runs over
        assert torch.equal(weights["embed_tokens"], exact["embed_tokens"])


def test_a_tied_model_shares_one_table(tmp_path: Path):
    path, weights = _hf(tmp_path, tied=True)
    model = pybitnet.load(path, lm_head="q6_k")
    assert model.embed_tokens is model.lm_head.weight
    assert sum(isinstance(m, QuantizedTable) for m in model.modules()) == 1
    ids = torch.tensor([[0, 5, CONFIG.vocab_size - 1]])
    looked_up = model._embed(ids)  # the embedding reads the blocks' values too
    values = gguf.quants.dequantize(model.embed_tokens.data.numpy(), gguf.GGMLQuantizationType.Q6_K)
    assert torch.equal(looked_up[0], torch.from_numpy(values[ids[0].numpy()]))


def test_a_model_built_from_float_weights_quantizes_them_the_same_way(tmp_path: Path):
    """Transformer(weights, lm_head=...) (synthetic specs, weights built in memory) gives the loader's bytes."""
    path, weights = _hf(tmp_path, tied=True)
    loaded = pybitnet.load(path, lm_head="q6_k")
    kept = dict(weights)
    built = Transformer(loaded.config, kept, lm_head="q6_k")
    assert torch.equal(built.lm_head.weight.data, loaded.lm_head.weight.data)
    assert kept["embed_tokens"] is weights["embed_tokens"]  # without release_weights the caller's dict is left alone
    synthetic_model = pybitnet.load("synthetic:tiny", lm_head="q8_0")  # rows of 128: whole Q8_0 blocks
    assert synthetic_model.lm_head.weight.type_name == "Q8_0"


def test_converting_writes_the_blocks_the_model_holds(tmp_path: Path):
    path, _ = _hf(tmp_path, tied=True)
    model = pybitnet.load(path, lm_head="q6_k")
    out = tmp_path / "q6_k.gguf"
    result = runner.invoke(app, ["convert", str(path), str(out), "--embed-type", "q6_k"])
    assert result.exit_code == 0, result.output
    with GGUFReader(out) as reader:
        info = reader.tensors["token_embd.weight"]
        assert info.type.name == "Q6_K" and "output.weight" not in reader.tensors
        written = reader.tensor_bytes(info).reshape(CONFIG.vocab_size, -1).copy()
    assert np.array_equal(written, model.lm_head.weight.data.numpy())
    # the GGUF file run as stored and the HF checkpoint quantized at load: one table, one kernel, the same bits
    converted = pybitnet.load(out)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(converted.forward_full(tokens), model.forward_full(tokens))
    # a loaded model's weights written as GGUF keep its blocks as they are
    again = tmp_path / "again.gguf"
    write_gguf(again, model.config, model.export_weights(), "tq2_0", embed_type="q6_k")
    _, reloaded = load_gguf_weights(again)
    assert torch.equal(reloaded["embed_tokens"].data, model.lm_head.weight.data)


def test_an_untied_model_quantizes_only_its_head_and_exports_its_blocks(tmp_path: Path):
    path, weights = _hf(tmp_path, tied=False)
    model = pybitnet.load(path, lm_head="q8_0")
    assert isinstance(model.lm_head.weight, QuantizedTable) and not isinstance(model.embed_tokens, QuantizedTable)
    assert torch.equal(model.embed_tokens, weights["embed_tokens"])
    out = tmp_path / "untied.gguf"
    write_gguf(out, model.config, model.export_weights(), "i2_s", embed_type="q8_0")
    _, reloaded = load_gguf_weights(out)
    assert torch.equal(reloaded["lm_head"].data, model.lm_head.weight.data)


def test_a_bad_mode_names_the_choices(tmp_path: Path):
    path, weights = _hf(tmp_path, tied=True)
    choices = "choose one of: exact, int8, q8_0, q6_k, q5_k, q4_k, q4_0"
    for bad in ("q3_k", "Q6_K", "", None):
        with pytest.raises(ConfigError, match=choices):
            pybitnet.load(path, lm_head=bad)
    with pytest.raises(ConfigError, match=choices):
        Transformer(CONFIG, weights, lm_head="q4")
    assert HEAD_MODES == ("exact", "int8", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0")


def test_rows_that_are_not_whole_blocks_are_refused_before_reading(tmp_path: Path):
    config = preset("tiny")  # rows of 128: not whole 256-value super-blocks
    path = save_hf(tmp_path / "tiny", config, synthetic.random_weights(config, 0))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")  # reading any tensor would fail
    with pytest.raises(ConfigError, match="whole Q6_K blocks of 256 values.*rows of 128"):
        pybitnet.load(path, lm_head="q6_k")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):  # Q8_0 blocks of 32 fit: the file is read
        pybitnet.load(path, lm_head="q8_0")
    with pytest.raises(ConfigError, match="whole Q4_K blocks of 256 values"):
        pybitnet.load("synthetic:tiny", lm_head="q4_k")


@pytest.mark.parametrize("stored", ["q8_0", "q4_k"])
def test_a_table_stored_in_another_block_type_is_refused(stored: str, tmp_path: Path):
    path = tmp_path / f"{stored}.gguf"
    write_gguf(path, CONFIG, synthetic.random_weights(CONFIG, 0), "i2_s", embed_type=stored)
    with pytest.raises(ConfigError, match=rf"token_embd\.weight .*stored as {stored.upper()} already.*twice"):
        pybitnet.load(path, lm_head="q6_k")
    _, weights = load_gguf_weights(path)  # the same type: the blocks as stored
    model = pybitnet.load(path, lm_head=stored)
    assert torch.equal(model.lm_head.weight.data, weights["embed_tokens"].data)


def test_a_non_finite_float_table_is_refused_by_name(tmp_path: Path):
    path, _ = _hf(tmp_path, tied=True)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.embed_tokens.weight"][QUANTIZE_ROWS + 3, 7] = float("nan")  # in the second chunk
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight.*non-finite"):
        pybitnet.load(path, lm_head="q6_k")


def test_the_int8_head_build_matches_a_whole_table_reference():
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.standard_normal((1500, 96)).astype(np.float32)).half()
    table[7] = 0  # an all-zero row
    codes, scales, sums = quantize_rows_int8(table, chunk=256)
    live = torch.arange(len(table)) != 7
    # absmax / 127 in float64, rounded once to float32: the float32 quotient, correctly rounded
    scale = (table.double().abs().amax(dim=1) / 127.0).float()
    assert torch.equal(scales[live], scale[live]) and scales[7] > 0 and not codes[7].any()
    expected = torch.round(table.float() / scales[:, None]).clamp(-127, 127)  # half to even, as ggml's rounding
    assert torch.equal(codes.float(), expected) and codes.abs().amax(dim=1)[live].eq(127).all()
    assert torch.equal(sums.long(), codes.long().sum(dim=1))
    head = LMHead(table, "int8")
    assert torch.equal(head.int8_weight, codes) and torch.equal(head.int8_sum, sums)


def _grown_during(setup: str, action: str) -> int:
    """Bytes the peak RSS of a fresh process rises above its RSS while `action` runs, after `setup`."""
    script = textwrap.dedent(setup) + textwrap.dedent("""
        def _status(key):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
        open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from the current RSS
        _before = _status("VmRSS")
    """) + textwrap.dedent(action) + '\nprint(_status("VmHWM") - _before)\n'
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


VOCAB, WIDTH = 32768, 1024  # a 64 MB f16 table: 128 MB in float32


def test_building_the_int8_head_never_widens_the_whole_table():
    """The int8 copy (32 MB) is all the build adds: not a float32 copy of the table (128 MB), nor an int32 one
    of the codes for their row sums (128 MB)."""
    setup = f"""
        import torch
        from pybitnet.head import LMHead
        table = torch.randn({VOCAB}, {WIDTH}, generator=torch.Generator().manual_seed(0)).half()
        LMHead(table[:64].clone(), "int8")  # whatever the first build maps once (libraries, thread pools)
    """
    grown = _grown_during(setup, 'head = LMHead(table, "int8")')
    codes = VOCAB * WIDTH
    print(f"\nbuilding the int8 head grew the peak RSS by {grown / 2**20:.1f} MiB ({codes / 2**20:.0f} MiB of codes)")
    # the codes and a few chunks' float32 temporaries (up to 64 MiB seen), far from the codes plus any whole-table
    # widening (float32 or int32: 128 MiB more)
    assert grown < codes + VOCAB * WIDTH * 3, f"{grown / 2**20:.1f} MiB for {codes / 2**20:.0f} MiB of codes"


def test_loading_a_quantized_head_never_holds_the_float_table(tmp_path: Path):
    """lm_head="q8_0" on an F16 GGUF: the peak is the blocks (34 MB) and a chunk, never the f16 table (64 MB)."""
    config = CONFIG.replace(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=256, num_layers=1)
    path = tmp_path / "f16.gguf"
    write_gguf(path, config, synthetic.random_weights(config, 0, embed_dtype=torch.float16), "i2_s", embed_type="f16")
    setup = """
        import pybitnet
        pybitnet.load("synthetic:tiny", lm_head="q8_0")  # whatever the first load maps once
    """
    grown = _grown_during(setup, f'model = pybitnet.load({str(path)!r}, lm_head="q8_0")')
    blocks, table = VOCAB * WIDTH // 32 * 34, VOCAB * WIDTH * 2
    print(f"\nloading grew the peak RSS by {grown / 2**20:.1f} MiB ({blocks / 2**20:.0f} MiB of blocks)")
    assert grown < blocks + table // 2, f"{grown / 2**20:.1f} MiB for {blocks / 2**20:.0f} MiB of blocks"


def test_while_loading_large_blocks_get_mappings_of_their_own():
    """runtime.loading(): while a model loads, a block of 1 MiB or more that the heap has no room for is mmapped
    (freed, it leaves no hole in the heap) instead of growing the heap; afterwards, and before, tune_allocator's
    thresholds have the heap grow for it. Nested loads keep the policy until the outer one ends."""
    script = textwrap.dedent("""
        import ctypes, torch
        from pybitnet import runtime

        class Mallinfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2

        def mapped_by_a_block(size):  # bytes of mmapped chunks a tensor of `size` bytes adds while it lives
            before = libc.mallinfo2().hblkhd
            block = torch.ones(size, dtype=torch.uint8)
            return libc.mallinfo2().hblkhd - before

        runtime.tune_allocator()
        seen = []
        with runtime.loading():  # first: a block the heap's free top would hold is served from there
            seen.append(mapped_by_a_block(64 << 20))
            with runtime.loading():
                pass
            seen.append(mapped_by_a_block(96 << 20))
        seen.append(mapped_by_a_block(128 << 20))
        print(*seen)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if "mallinfo2" in out.stderr:
        pytest.skip("not glibc 2.33 or later (no mallinfo2)")
    assert out.returncode == 0, out.stderr
    loading, after_nested, after = map(int, out.stdout.split())
    assert loading >= 64 << 20 and after_nested >= 96 << 20  # mappings of their own, inside the outer load too
    assert after == 0  # tune_allocator's 1 GiB threshold: from the heap
