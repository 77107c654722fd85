"""Training runs end to end: determinism, bit-exact resume, the CLI, and the files it writes.

Corpora are generated here from a fixed word list (seeded), models are the tiny/small presets trained
for a handful of steps: what is checked is the machinery, not the quality of the model.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

import pybitnet
from pybitnet import load_tokenizer
from pybitnet.cli.train_cmds import write_gguf_beside
from pybitnet.errors import InputError
from pybitnet.train.trainer import Run, TrainOptions, lr_at

import reference_numpy
from rules import assert_float64_rule

WORDS = ("the king said unto them and the people went up to the city of gold in the morning when light "
         "came over the water a man and his son walked by the river and spoke of bread wine and peace").split()


pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(path, lines: int = 400, seed: int = 0):
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _options(tmp_path, name: str, **changes) -> TrainOptions:
    base = dict(corpus=str(_corpus(tmp_path / "corpus.txt")), preset="tiny", out=str(tmp_path / name), tokens=8 * 2 * 16,
                batch=2, ctx=16, lr=3e-3, seed=1, eval_every=4, eval_windows=4, checkpoint_every=2)
    base.update(changes)
    return TrainOptions(**base)


def _train(options: TrainOptions, resume: bool = False) -> Run:
    run = Run(options, resume=resume, progress=False)
    run.train()
    return run


def _same_state(a: Run, b: Run) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs"
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for key in sa:
        for field in sa[key]:
            assert torch.equal(torch.as_tensor(sa[key][field]), torch.as_tensor(sb[key][field]))


def test_resume_is_bit_exact(tmp_path):
    straight = _train(_options(tmp_path, "straight"))
    assert straight.step == 8 and straight.finished
    half = _train(_options(tmp_path, "halves", stop_after=4))
    assert half.step == 4 and not half.finished
    resumed = _train(_options(tmp_path, "halves"), resume=True)
    assert resumed.step == 8
    _same_state(straight, resumed)
    assert resumed.history["train"] == straight.history["train"]
    assert resumed.history["validation"] == straight.history["validation"]
    # and training moved the weights: the check above compares something that changed
    fresh = Run(_options(tmp_path, "fresh"), progress=False)
    assert not torch.equal(fresh.model.embed_tokens, straight.model.embed_tokens)
    assert straight.history["train"][-1][1] < straight.history["train"][0][1]


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    a = _train(_options(tmp_path, "a", tokens=3 * 32))
    b = _train(_options(tmp_path, "b", tokens=3 * 32))
    c = _train(_options(tmp_path, "c", tokens=3 * 32, seed=2))
    _same_state(a, b)
    assert not torch.equal(a.model.embed_tokens, c.model.embed_tokens)


def test_resume_refuses_a_changed_recipe_or_missing_checkpoint(tmp_path):
    _train(_options(tmp_path, "run", stop_after=2))
    with pytest.raises(InputError, match="different options.*batch"):
        Run(_options(tmp_path, "run", batch=3), resume=True, progress=False)
    with pytest.raises(InputError, match="no checkpoint"):
        Run(_options(tmp_path, "elsewhere"), resume=True, progress=False)


def test_bad_corpus_and_options_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        Run(_options(tmp_path, "x", corpus=str(tmp_path / "missing.txt")), progress=False)
    (tmp_path / "short.txt").write_text("just one line\n")
    with pytest.raises(InputError, match="too little text"):
        Run(_options(tmp_path, "x", corpus=str(tmp_path / "short.txt")), progress=False)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00" * 100)
    with pytest.raises(InputError, match="not UTF-8"):
        Run(_options(tmp_path, "x", corpus=str(tmp_path / "binary.txt")), progress=False)
    with pytest.raises(InputError, match="--batch must be positive"):
        Run(_options(tmp_path, "x", batch=0), progress=False)


def test_learning_rate_schedule():
    peak, total = 1e-3, 100
    assert lr_at(0, total, peak, 0.1, 0.05) == pytest.approx(peak / 5)  # warmup of 5 steps
    assert lr_at(4, total, peak, 0.1, 0.05) == pytest.approx(peak)
    assert lr_at(99, total, peak, 0.1, 0.05) == pytest.approx(0.1 * peak)  # cosine floor at the last step
    mid = 5 + (99 - 5) / 2
    assert lr_at(int(mid), total, peak, 0.1, 0.05) == pytest.approx(peak * 0.55, rel=2e-2)


def test_float_baseline_trains_the_same_architecture(tmp_path):
    run = _train(_options(tmp_path, "float", float_weights=True, tokens=3 * 32))
    log = run.write_outputs()
    assert (tmp_path / "float" / "float_model.safetensors").is_file()
    assert not (tmp_path / "float" / "model.safetensors").exists()
    quantized = Run(_options(tmp_path, "q"), progress=False)
    assert log["parameters"] == sum(p.numel() for p in quantized.model.parameters())
    assert log["held_out_perplexity"] == pytest.approx(2.718281828 ** log["held_out_loss"])


def test_cli_trains_and_writes_loadable_files(tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-m", "pybitnet", "train", str(corpus), "--preset", "tiny", "--out", str(out),
                           "--tokens", "128", "--batch", "2", "--ctx", "16", "--eval-every", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss" in proc.stdout
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 4 and log["tokens_seen"] == 128
    model = pybitnet.load(out)
    gguf = pybitnet.load(out / "model-i2_s.gguf")
    tokens = torch.tensor([[0, 5, 9, 33, 7, 2]])
    assert torch.equal(model.forward_full(tokens), gguf.forward_full(tokens))
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("the king said")) == "the king said"
    assert tok.encode("the king")[0] == tok.bos_token_id == 0
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>User: hi<|eot_id|>Assistant: "
    assert set(tok.stop_token_ids) == {1, 2}


def test_cli_error_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    from pybitnet.cli import main

    monkeypatch.setattr(sys, "argv", ["pybitnet", "train", str(tmp_path / "none.txt"), "--preset", "tiny",
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_round_trip_hf_gguf_i2s_tq20_and_numpy_reference(tmp_path):
    """A few-step trained model of the built-in shape: HF packed, GGUF I2_S and TQ2_0 give identical
    logits; float64 logits match the independent numpy reference."""
    run = _train(_options(tmp_path, "small", preset="small", tokens=2 * 2 * 16, checkpoint_every=100))
    run.write_outputs()
    out = tmp_path / "small"
    files = [out, write_gguf_beside(out, "i2_s"), write_gguf_beside(out, "tq2_0")]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, run.config.vocab_size, (1, 40), generator=gen)
    for dtype in (torch.float32, torch.float64):
        hf, i2s, tq2 = (pybitnet.load(f, dtype=dtype).forward_full(tokens) for f in files)
        assert torch.equal(hf, i2s) and torch.equal(hf, tq2)
    assert_float64_rule(hf[0], torch.from_numpy(reference_numpy.ReferenceModel.from_hf_dir(out).forward(tokens[0].tolist())))
