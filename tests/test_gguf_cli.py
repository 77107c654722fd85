"""`pybitnet convert`: HF checkpoint -> GGUF of every type, GGUF -> GGUF, tokenizer carried along, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pybitnet import load_tokenizer
from pybitnet.cli import app
from pybitnet.errors import InputError
from pybitnet.loaders.gguf import load_gguf_weights, read_gguf_metadata
from pybitnet.loaders.gguf_file import GGUFReader, ValueType
from pybitnet.loaders.hf import load_hf_weights
from pybitnet.weights import TernaryWeight

runner = CliRunner()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, write_text_checkpoint) -> Path:
    return write_text_checkpoint(tmp_path_factory.mktemp("hf"), tied=True)


@pytest.mark.parametrize("qtype", ["i2_s", "f16"])  # tiny's rows of 128 cannot be TQ blocks
def test_convert_hf_dir(hf_dir: Path, tmp_path: Path, qtype: str):
    dst = tmp_path / "m.gguf"
    result = runner.invoke(app, ["convert", str(hf_dir), str(dst), "--type", qtype])
    assert result.exit_code == 0, result.output
    assert f"wrote {dst} ({qtype}, " in result.output and "tokenizer included" in result.output
    config, weights = load_gguf_weights(dst)
    hf_config, hf_weights, _ = load_hf_weights(hf_dir)
    assert config == hf_config
    for name, value in hf_weights.items():
        if isinstance(value, TernaryWeight):
            assert torch.equal(weights[name].values, value.values), name
    # the tokenizer travels: the GGUF-built tokenizer encodes like the HF one
    gguf_tok, hf_tok = load_tokenizer(dst), load_tokenizer(hf_dir)
    for text in ["The quick brown fox jumps over the lazy dog.", "Unicode: café, 日本語, 🙂", "unseen words: zyxwvut"]:
        assert gguf_tok.encode(text) == hf_tok.encode(text), text
    with GGUFReader(dst) as reader:
        assert reader.fields["tokenizer.ggml.token_type"].elem_type == ValueType.INT32
        assert len(reader.metadata["tokenizer.ggml.tokens"]) == config.vocab_size


def test_convert_gguf_to_gguf_keeps_tokenizer(hf_dir: Path, tmp_path: Path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert runner.invoke(app, ["convert", str(hf_dir), str(first)]).exit_code == 0
    result = runner.invoke(app, ["convert", str(first), str(second), "--type", "f16", "--embed-type", "bf16"])
    assert result.exit_code == 0, result.output
    meta_a, meta_b = read_gguf_metadata(first), read_gguf_metadata(second)
    assert {k: v for k, v in meta_a.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in meta_b.items() if k.startswith("tokenizer.")}
    assert meta_b["general.architecture"] == "bitnet" and meta_b["bitnet.hidden_activation"] == "relu2"
    (_, wa), (_, wb) = load_gguf_weights(first), load_gguf_weights(second)
    assert wb["embed_tokens"].dtype == torch.bfloat16
    assert all(torch.equal(wa[n].values, wb[n].values) for n in wa if isinstance(wa[n], TernaryWeight))


def test_convert_without_tokenizer_writes_no_vocab(tmp_path: Path):
    from pybitnet import preset, synthetic
    from pybitnet.loaders.hf import save_hf

    src = save_hf(tmp_path / "hf", preset("tiny"), synthetic.random_weights(preset("tiny"), 0))
    dst = tmp_path / "m.gguf"
    result = runner.invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code == 0 and "no tokenizer" in result.output
    assert read_gguf_metadata(dst)["tokenizer.ggml.model"] == "no_vocab"


@pytest.fixture
def convert(cli):
    return lambda *args: cli("convert", *args)


def test_convert_errors_are_one_line(hf_dir: Path, tmp_path: Path, convert):
    run = convert

    bad_type = run(str(hf_dir), str(tmp_path / "x.gguf"), "--type", "q4_0")
    assert bad_type.code == 1 and "error: --type must be one of i2_s, tq1_0, tq2_0, f16" in bad_type.err
    tq_tiny = run(str(hf_dir), str(tmp_path / "x.gguf"), "--type", "tq2_0")
    assert tq_tiny.code == 1 and "not a multiple of 256" in tq_tiny.err
    assert "Traceback" not in tq_tiny.err and not (tmp_path / "x.gguf").exists()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    junk = run(str(tmp_path / "junk.gguf"), str(tmp_path / "y.gguf"))
    assert junk.code == 1 and "not a GGUF file: magic b'not '" in junk.err


def test_convert_never_writes_over_its_source(hf_dir: Path, tmp_path: Path, convert):
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    for name in ("model.safetensors", "config.json"):
        for force in ((), ("--force",)):
            done = convert(str(hf_dir), str(hf_dir / name), *force)
            assert done.code == 1 and "would write over the source" in done.err, done.err
    gguf = tmp_path / "m.gguf"
    assert convert(str(hf_dir), str(gguf)).code == 0
    written = gguf.read_bytes()
    done = convert(str(gguf), str(gguf), "--force")
    assert done.code == 1 and "would write over the source" in done.err
    assert gguf.read_bytes() == written
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before


def test_convert_writes_a_new_file_next_to_its_source(hf_dir: Path, tmp_path: Path, convert):
    """DIR -> DIR/model.gguf (or an HF directory inside DIR) is allowed: the loader never reads them, and
    the source reads the same afterwards. Names it would read stay refused."""
    import shutil

    from pybitnet.loaders import convert as convert_model
    from pybitnet.loaders import load_weights

    source = tmp_path / "model"
    shutil.copytree(hf_dir, source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    config, weights, _ = load_weights(source)
    done = convert(str(source), str(source / "model.gguf"))
    assert done.code == 0 and "tokenizer included" in done.out, done.err
    done = convert(str(source), str(source / "packed"))  # an HF directory inside the source
    assert done.code == 0, done.err
    for written in (source / "model.gguf", source / "packed"):
        got_config, got, _ = load_weights(written)
        assert got_config == config
        assert all(torch.equal(got[n].values, weights[n].values) for n in weights if isinstance(weights[n], TernaryWeight))
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file() and p.name != "model.gguf"} == before
    again_config, again, _ = load_weights(source)  # the source still loads as it did
    assert again_config == config and again.keys() == weights.keys()
    done = convert(str(source), str(source / "model.gguf"))  # what the user made is kept without --force
    assert done.code == 1 and "exists" in done.err and "--force" in done.err
    for name in ("more.safetensors", "tokenizer.json", "generation_config.json"):  # read, or would be
        done = convert(str(source), str(source / name), "--force")
        assert done.code == 1 and "would write over the source" in done.err, (name, done.err)
    with pytest.raises(InputError, match="would write over the source"):  # a directory holding the source
        convert_model(str(source), tmp_path, overwrite=True)
    assert (source / "config.json").is_file() and not (source / "more.safetensors").exists()


def test_convert_replaces_an_existing_file_only_with_force(hf_dir: Path, tmp_path: Path, convert):
    dst = tmp_path / "out.gguf"
    dst.write_text("precious")
    done = convert(str(hf_dir), str(dst))
    assert done.code == 1 and f"{dst}: exists" in done.err and "--force" in done.err
    assert dst.read_text() == "precious"
    assert convert(str(hf_dir), str(dst), "--force").code == 0
    assert load_gguf_weights(dst)[0] == load_hf_weights(hf_dir)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]  # no temporary file left behind


def test_convert_destination_problems_are_one_line(hf_dir: Path, tmp_path: Path, convert):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "dir.gguf").mkdir()
    for args, message in [
        ((tmp_path / "dir.gguf",), "is a directory; give the output file"),
        ((tmp_path,), "exists"),
        ((tmp_path, "--force"), "holds no model (no config.json); refusing to replace it"),
        ((tmp_path / "no" / "such" / "out.gguf",), f"{tmp_path / 'no' / 'such'} does not exist"),
    ]:
        done = convert(str(hf_dir), *map(str, args))
        assert done.code == 1 and message in done.err and len(done.err.splitlines()) == 1, done.err
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not (tmp_path / "no").exists()


def test_convert_takes_a_synthetic_model_with_its_tokenizer(tmp_path: Path, convert):
    import pybitnet
    from pybitnet.loaders import load_weights

    done = convert("synthetic:tiny:1", str(tmp_path / "s.gguf"))
    assert done.code == 0 and "tokenizer included" in done.out, done.err
    done = convert("synthetic:tiny:1", str(tmp_path / "hf"))
    assert done.code == 0 and "Hugging Face packed" in done.out, done.err
    config, weights, _ = load_weights("synthetic:tiny:1")
    for written in (tmp_path / "s.gguf", tmp_path / "hf"):
        got_config, got, _ = load_weights(written)
        assert got_config.num_layers == 1 and got_config.vocab_size == config.vocab_size
        assert all(torch.equal(got[n].values, w.values) for n, w in weights.items() if isinstance(w, TernaryWeight))
        ids = load_tokenizer(written).encode("hello world")
        assert ids == load_tokenizer("synthetic:tiny").encode("hello world")
        assert pybitnet.load(written).forward_full(torch.tensor([ids])).shape == (1, len(ids), config.vocab_size)
