"""MODEL specs: every form (HF directory, .gguf file, synthetic:PRESET[:LAYERS], Hub repo id) loads through
`load`, `load_weights` and `load_tokenizer`; synthetic models have a tokenizer and convert to both formats."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pybitnet
from pybitnet import CheckpointError, ConfigError, InputError, load_tokenizer, synthetic
from pybitnet.loaders import convert, load_weights
from pybitnet.weights import TernaryWeight

TEXTS = ["hello world", "héllo wörld — ünïcode ✓ 漢字", "  spaces\tand\nnewlines  ", "1234567 + 89 = ?!"]


@pytest.mark.parametrize("name", ["tiny", "bitnet-b1.58-2b-4t"])
def test_synthetic_tokenizer_round_trips_text_with_the_presets_special_ids(name):
    config = pybitnet.preset(name)
    tok = load_tokenizer(f"synthetic:{name}")
    assert tok.vocab_size == config.vocab_size
    assert tok.bos_token_id == config.bos_token_id and tok.eos_token_id == config.eos_token_ids[0]
    assert set(config.eos_token_ids) <= set(tok.stop_token_ids)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == config.bos_token_id  # BOS first, as the model's own tokenizer would add it
        assert len(ids) - 1 == len(text.encode("utf-8"))  # one token a byte
        assert all(0 <= i < config.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert load_tokenizer(f"synthetic:{name}").encode(TEXTS[1]) == tok.encode(TEXTS[1])  # deterministic
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == config.bos_token_id and chat.count(config.bos_token_id) == 1


def test_synthetic_spec_loads_seed_zero_weights_with_its_layer_count():
    config, weights, info = load_weights("synthetic:tiny:1")
    assert config == pybitnet.preset("tiny").replace(num_layers=1) and info["format"] == "synthetic"
    expected = synthetic.random_weights(config, 0)
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        got = weights[name]
        if isinstance(value, TernaryWeight):
            assert torch.equal(got.values, value.values) and got.beta == value.beta
        else:
            assert torch.equal(got, value)
    model = pybitnet.load("synthetic:tiny:1", dtype=torch.float64)
    twin = synthetic.random_model("tiny", seed=0, num_layers=1, dtype=torch.float64)
    tokens = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(model.forward_full(tokens), twin.forward_full(tokens))


@pytest.mark.parametrize("spec,error,match", [
    ("synthetic:tiny:x", InputError, "LAYERS.*'x'"),
    ("synthetic:tiny:0", InputError, "LAYERS"),
    ("synthetic:nonesuch", ConfigError, "unknown preset 'nonesuch'.*tiny"),
    ("no/such/model.gguf", CheckpointError, "no such file or directory.*repo id"),
    ("./nowhere", CheckpointError, "no such file or directory.*synthetic:PRESET"),
])
def test_bad_specs_say_what_was_tried(spec, error, match):
    for loader in (load_weights, pybitnet.load, load_tokenizer):
        with pytest.raises(error, match=match):
            loader(spec)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {"gguf": convert("synthetic:tiny", root / "tiny.gguf"), "hf": convert("synthetic:tiny", root / "tiny-hf")}


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_converted_synthetic_model_gives_the_same_logits_and_tokens(converted, kind):
    path = converted[kind]
    original_tok, tok = load_tokenizer("synthetic:tiny"), load_tokenizer(path)
    for text in TEXTS:
        assert tok.encode(text) == original_tok.encode(text)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == original_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])
    tokens = torch.tensor([original_tok.encode(TEXTS[1])])
    assert torch.equal(pybitnet.load(path, dtype=torch.float64).forward_full(tokens), _stored_twin_logits(tokens))


def _stored_twin_logits(tokens: torch.Tensor) -> torch.Tensor:
    """float64 logits of synthetic:tiny with each projection scale rounded to the float32 both formats store;
    everything else (ternaries, bf16 embedding, fp32 norms) the files hold exactly."""
    config, weights, _ = load_weights("synthetic:tiny")
    stored = {name: w.with_beta(float(np.float32(w.beta))) if isinstance(w, TernaryWeight) else w
              for name, w in weights.items()}
    return pybitnet.Transformer(config, stored, dtype=torch.float64).forward_full(tokens)


def test_converted_hf_directory_loads_in_transformers_tokenizer(converted):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(converted["hf"]))
    assert auto(TEXTS[0])["input_ids"] == load_tokenizer("synthetic:tiny").encode(TEXTS[0])


def test_convert_never_writes_over_its_source_or_an_existing_destination(converted, tmp_path):
    gguf, hf = converted["gguf"], converted["hf"]
    before = gguf.read_bytes()
    with pytest.raises(InputError, match="over the source"):
        convert(gguf, gguf, overwrite=True)
    with pytest.raises(InputError, match="over the source"):  # a file the source's loader reads
        convert(hf, hf / "config.json", overwrite=True)
    with pytest.raises(InputError, match="exists.*overwrite"):
        convert("synthetic:tiny:1", gguf)
    assert gguf.read_bytes() == before
    with pytest.raises(InputError, match="does not exist"):
        convert("synthetic:tiny", tmp_path / "missing" / "x.gguf")
    with pytest.raises(InputError, match="is a directory"):
        convert("synthetic:tiny", _gguf_named_dir(tmp_path), overwrite=True)
    out = convert("synthetic:tiny:1", tmp_path / "one", overwrite=False)
    convert("synthetic:tiny", out, overwrite=True)  # replaced whole, once complete
    assert load_weights(out)[0].num_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "one"]  # no staging left behind


def _gguf_named_dir(tmp_path: Path) -> Path:
    (tmp_path / "dir.gguf").mkdir()
    return tmp_path / "dir.gguf"


def test_hub_repo_id_loads_from_the_local_cache_when_offline(converted, tmp_path):
    from hub_server import serve_repo

    cache = tmp_path / "hub-cache"
    endpoint, server = serve_repo(converted["hf"], "someone/tiny-bitnet")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    try:  # huggingface_hub itself lays out the cache: blobs, snapshots, refs
        subprocess.run([sys.executable, "-c", "import huggingface_hub as h; h.snapshot_download('someone/tiny-bitnet')"],
                       env=env, check=True, capture_output=True, timeout=120)
    finally:
        server.shutdown()
    assert (cache / "models--someone--tiny-bitnet" / "refs" / "main").is_file()
    probe = (
        "import torch, pybitnet\n"
        "from pybitnet import load_tokenizer\n"
        "tokens = torch.tensor([load_tokenizer('someone/tiny-bitnet').encode('hello world')])\n"
        "model = pybitnet.load('someone/tiny-bitnet', dtype=torch.float64)\n"
        "torch.save((tokens, model.forward_full(tokens), model.source), 'out.pt')\n"
        "try:\n"
        "    pybitnet.load('someone/not-cached')\n"
        "except pybitnet.CheckpointError as err:\n"
        "    print(err)\n"
    )
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    result = subprocess.run([sys.executable, "-c", probe], env=offline, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "someone/not-cached" in result.stdout and "not in the local cache" in result.stdout
    tokens, logits, source = torch.load(tmp_path / "out.pt")
    assert source["repo_id"] == "someone/tiny-bitnet" and source["format"] == "hf"
    assert tokens.tolist() == [load_tokenizer("synthetic:tiny").encode("hello world")]
    assert torch.equal(logits, _stored_twin_logits(tokens))
