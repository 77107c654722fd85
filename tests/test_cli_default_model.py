"""MODEL may be omitted: the commands then run the built-in model shipped with the package."""

from __future__ import annotations

import torch

import pybitnet
from pybitnet import load_tokenizer
from pybitnet.cli.model_spec import names_a_model, split_model
from pybitnet.generate import generate


def test_generate_without_model_runs_the_builtin_model_greedily(cli):
    done = cli("generate", "And God said", "-n", "12", "--temperature", "0", "--no-stream", "--threads", "1")
    assert done.code == 0, done.err
    # The same text as the library's greedy generation with the built-in model and its tokenizer.
    expected = generate(pybitnet.load("builtin"), load_tokenizer("builtin"), ["And God said"], max_new_tokens=12).texts[0]
    assert expected.strip() and expected in done.out


def test_perplexity_without_model_scores_the_file_with_the_builtin_model(cli, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("In the beginning God created the heaven and the earth.")
    done = cli("perplexity", str(document), "--threads", "1")
    assert done.code == 0, done.err
    tokens = load_tokenizer("builtin").encode(document.read_text())
    assert f"{len(tokens) - 1} tokens scored" in done.out


def test_info_defaults_to_the_builtin_model(cli):
    done = cli("info")
    assert done.code == 0, done.err
    assert "builtin" in done.out and str(pybitnet.load().config.num_layers) in done.out


def test_score_defaults_to_the_builtin_model(cli):
    done = cli("score", "--tokens", "1,2,3")
    assert done.code == 0, done.err
    logp = torch.log_softmax(pybitnet.load().forward_full(torch.tensor([[1, 2, 3]]))[0].double(), -1)
    total = float(logp[0, 2] + logp[1, 3])
    assert f"total log p = {total:.4f}" in done.out


def test_a_first_argument_is_a_model_only_when_it_names_one(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    assert names_a_model("builtin") and names_a_model("synthetic:tiny") and names_a_model(str(tmp_path))
    assert names_a_model("owner/repo-name") and names_a_model("missing.gguf")
    assert not names_a_model("Once upon a time") and not names_a_model(str(text_file))
    assert split_model(["Once upon a time"]) == ("builtin", ["Once upon a time"])
    assert split_model(["synthetic:tiny", "x.txt"]) == ("synthetic:tiny", ["x.txt"])
    assert split_model([]) == ("builtin", [])


def test_load_with_no_spec_is_the_builtin_model():
    model = pybitnet.load()
    assert model.source["path"] == "builtin"
    assert model.config.hidden_act == "relu2" and model.config.sub_norms
    logits = model.forward_full(torch.tensor([[0, 5, 9]]))
    assert torch.isfinite(logits).all()
