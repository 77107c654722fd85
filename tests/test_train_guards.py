"""What `pybitnet train` refuses and how it fails: checkpoints that would run code, runs it would overwrite,
resumes that would continue another run, divergence, a full disk, bad options, and what a failed run
leaves on disk (nothing of its own). Models are the tiny preset trained for a few steps.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import random

import pytest
import torch

import pybitnet
from pybitnet.config import PRESETS
from pybitnet.errors import CheckpointError, InputError
from pybitnet.train.trainer import CHECKPOINT, Run, TrainingDiverged, TrainOptions, read_checkpoint

WORDS = ("the king said unto them and the people went up to the city of gold in the morning when light "
         "came over the water a man and his son walked by the river and spoke of bread wine and peace").split()

pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(path, lines: int = 400, seed: int = 0):
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _train_args(corpus, out, *extra: str) -> list[str]:
    return ["train", str(corpus), "--preset", "tiny", "--out", str(out), "--tokens", "128", "--batch", "2",
            "--ctx", "16", "--eval-every", "2", "--checkpoint-every", "1", "--threads", "1", *extra]


def _options(tmp_path, name: str, **changes) -> TrainOptions:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        _corpus(corpus)
    base = dict(corpus=str(corpus), preset="tiny", out=str(tmp_path / name), tokens=4 * 2 * 16, batch=2, ctx=16,
                lr=3e-3, seed=1, eval_every=4, eval_windows=4, checkpoint_every=2)
    base.update(changes)
    return TrainOptions(**base)


def _error_line(err: str) -> str:
    """The last line of stderr (a progress bar may come before it) and a check that it is the only error."""
    assert "Traceback" not in err and "internal error" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    return last


def _snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------- loading checkpoints


class _WritesMarker:
    """Unpickled, this object opens (creates) a file: what a crafted checkpoint could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, cli, container):
    corpus = _corpus(tmp_path / "corpus.txt")

    def craft(path, marker):
        state = {"format": 2, "step": 1, "model": _WritesMarker(marker)}
        if container == "torch.save":
            torch.save(state, path)
        else:
            path.write_bytes(pickle.dumps(state))

    # the crafted file is live: loaded the unsafe way, it creates its marker
    craft(tmp_path / "live.pt", tmp_path / "live-marker")
    if container == "torch.save":
        torch.load(tmp_path / "live.pt", weights_only=False)
    else:
        pickle.loads((tmp_path / "live.pt").read_bytes())
    assert (tmp_path / "live-marker").exists()

    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "marker"
    craft(out / CHECKPOINT, marker)
    result = cli(*_train_args(corpus, out, "--resume"))
    assert result.code == 1
    line = _error_line(result.err)
    assert str(out / CHECKPOINT) in line and "refusing" in line
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]


def test_empty_or_truncated_checkpoint_is_an_error_naming_it(tmp_path, cli):
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert cli(*_train_args(corpus, out, "--stop-after", "2")).code == 0
    whole = (out / CHECKPOINT).read_bytes()
    for damaged in (b"", whole[: len(whole) // 2]):
        (out / CHECKPOINT).write_bytes(damaged)
        result = cli(*_train_args(corpus, out, "--resume"))
        assert result.code == 1, result.err
        assert "interrupted" not in result.err
        assert str(out / CHECKPOINT) in _error_line(result.err)


def test_checkpoint_holds_only_tensors_and_plain_data(tmp_path):
    run = Run(_options(tmp_path, "run", stop_after=2), progress=False)
    run.train()
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)  # raises on anything else
    assert state["step"] == 2 and state["recipe"]["batch"] == 2
    assert state["config"]["vocab_size"] == run.config.vocab_size
    assert len(state["tokenizer_sha256"]) == len(state["corpus_sha256"]) == 64


# ---------------------------------------------------------------------------------------- --out, --force, --resume


def test_out_holding_a_run_is_refused_without_resume_or_force(tmp_path, cli):
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert cli(*_train_args(corpus, out, "--stop-after", "3")).code == 0
    before = _snapshot(out)
    assert read_checkpoint(out / CHECKPOINT)["step"] == 3

    again = cli(*_train_args(corpus, out, "--tokens", "64"))
    assert again.code == 1
    line = _error_line(again.err)
    assert str(out) in line and "--resume" in line and "--force" in line
    assert _snapshot(out) == before  # nothing replaced: not the checkpoint, not the tokenizer

    # a run that fails its own checks on the same directory writes nothing either
    other = _corpus(tmp_path / "other.txt", seed=5)
    assert cli(*_train_args(other, out, "--warmup", "-5")).code == 1
    assert cli(*_train_args(other, out, "--resume")).code == 1
    assert _snapshot(out) == before

    # --resume continues it, --force replaces it
    assert cli(*_train_args(corpus, out, "--resume")).code == 0
    assert read_checkpoint(out / CHECKPOINT)["step"] == 4
    assert (out / "model.safetensors").is_file()
    forced = cli(*_train_args(corpus, out, "--force", "--tokens", "64", "--stop-after", "1"))
    assert forced.code == 0, forced.err
    assert read_checkpoint(out / CHECKPOINT)["step"] == 1
    assert not (out / "model.safetensors").exists()  # the replaced run's model is gone, not left beside the new one


def test_empty_out_directory_is_used(tmp_path, cli):
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "empty"
    out.mkdir()
    assert cli(*_train_args(corpus, out, "--stop-after", "1")).code == 0
    assert read_checkpoint(out / CHECKPOINT)["step"] == 1


def test_resume_refuses_another_tokenizer_corpus_or_recipe(tmp_path):
    Run(_options(tmp_path, "run", stop_after=2), progress=False).train()
    out = tmp_path / "run"
    before = _snapshot(out)
    # a tokenizer trained on other text, named with --tokenizer or put in place of the run's
    other_dir = tmp_path / "other-run"
    Run(_options(tmp_path, "other-run", corpus=str(_corpus(tmp_path / "other.txt", seed=7)), stop_after=1),
        progress=False).train()
    with pytest.raises(InputError, match="different tokenizer"):
        Run(_options(tmp_path, "run", tokenizer=str(other_dir)), resume=True, progress=False)
    with pytest.raises(InputError, match="different corpus"):
        Run(_options(tmp_path, "run", corpus=str(tmp_path / "other.txt")), resume=True, progress=False)
    with pytest.raises(InputError, match=r"different options \(lr 0.003 in the checkpoint, 0.001 now\)"):
        Run(_options(tmp_path, "run", lr=1e-3), resume=True, progress=False)
    assert _snapshot(out) == before
    (out / "tokenizer.json").write_bytes((other_dir / "tokenizer.json").read_bytes())
    with pytest.raises(InputError, match=f"different tokenizer than {out / 'tokenizer.json'}"):
        Run(_options(tmp_path, "run"), resume=True, progress=False)
    # the same corpus under another name is the same corpus
    (tmp_path / "copy.txt").write_bytes((tmp_path / "corpus.txt").read_bytes())
    (out / "tokenizer.json").write_bytes(before["tokenizer.json"])
    assert Run(_options(tmp_path, "run", corpus=str(tmp_path / "copy.txt")), resume=True, progress=False).step == 2


def test_old_style_checkpoint_is_refused_by_name(tmp_path):
    Run(_options(tmp_path, "run", stop_after=2), progress=False).train()
    path = tmp_path / "run" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    del state["tokenizer_sha256"], state["corpus_sha256"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"{path}: not a training checkpoint of this pybitnet"):
        Run(_options(tmp_path, "run"), resume=True, progress=False)


# ---------------------------------------------------------------------------------------- divergence


def test_divergence_stops_with_the_last_finite_checkpoint(tmp_path, cli):
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    result = cli(*_train_args(corpus, out, "--lr", "1e6", "--tokens", "512"))  # 16 steps
    assert result.code == 1
    line = _error_line(result.err)
    assert "diverged" in line and "--lr" in line
    state = read_checkpoint(out / CHECKPOINT)
    assert 1 <= state["step"] < 16
    assert f"step {state['step']}, is kept" in line
    for name, tensor in state["model"].items():
        assert torch.isfinite(tensor).all(), name
    assert all(math.isfinite(loss) for _, loss in state["history"]["train"])
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_non_finite_gradient_stops_before_the_update_and_first_write(tmp_path):
    run = Run(_options(tmp_path, "run"), progress=False)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    loss = run.model.loss
    run.model.loss = lambda tokens, targets: _InfiniteGradient.apply(loss(tokens, targets))
    with pytest.raises(TrainingDiverged, match="step 1 .*gradient norm is (inf|nan).*no checkpoint was written"):
        run.train()
    assert run.step == 0
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not (tmp_path / "run").exists()  # nothing written, so no directory left behind


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    run = Run(_options(tmp_path, "run", stop_after=2), progress=False)
    run.train()
    saved = (tmp_path / "run" / CHECKPOINT).read_bytes()
    with torch.no_grad():
        run.model.embed_tokens[0, 0] = math.inf
    with pytest.raises(TrainingDiverged, match="weights are no longer finite.*step 2, is kept"):
        run.save_checkpoint()
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == saved


# ---------------------------------------------------------------------------------------- failures while writing


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC, as write(2) does there."""

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_one_line_naming_the_file_and_keeps_the_checkpoint(tmp_path, cli, monkeypatch):
    """The first checkpoint is written, then the disk is full."""
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        return real_save(obj, f if len(calls) == 1 else _FullDisk(), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    result = cli(*_train_args(corpus, out))
    assert result.code == 1
    assert _error_line(result.err) == f"error: No space left on device: {out / CHECKPOINT}"
    assert read_checkpoint(out / CHECKPOINT)["step"] == 1  # the one written before the disk filled
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_failed_first_write_removes_the_directory_it_made(tmp_path, monkeypatch):
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: real_save(obj, _FullDisk(), *args, **kwargs))
    out = tmp_path / "new" / "run"
    with pytest.raises(OSError) as failure:
        Run(_options(tmp_path, "new/run"), progress=False).train()
    assert (failure.value.errno, failure.value.filename) == (errno.ENOSPC, str(out / CHECKPOINT))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("option, value, message", [
    ("--warmup", "-5", "--warmup is a fraction of the steps, from 0 to 1, got -5.0"),
    ("--warmup", "1.5", "--warmup is a fraction of the steps, from 0 to 1, got 1.5"),
    ("--weight-decay", "-100", "--weight-decay must be from 0 to 1, got -100.0"),
    ("--lr", "inf", "--lr must be a positive number, got inf"),
    ("--lr", "nan", "--lr must be a positive number, got nan"),
    ("--stop-after", "0", "--stop-after must be positive, got 0"),
    ("--ctx", "100000", "fewer than one window of --ctx 100000"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, cli, option, value, message):
    corpus = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    result = cli(*_train_args(corpus, out, option, value))
    assert result.code == 1
    assert message in _error_line(result.err)
    assert not out.exists()


def test_config_states_the_positions_the_model_trained_on(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", PRESETS["tiny"].replace(max_position_embeddings=16))
    run = Run(_options(tmp_path, "long", ctx=24, tokens=24 * 2), progress=False)
    run.train()
    run.write_outputs()
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    assert config["max_position_embeddings"] == 24
    model = pybitnet.load(tmp_path / "long")
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model.forward_full(tokens)).all()
    short = Run(_options(tmp_path, "short", ctx=8), progress=False)
    assert short.config.max_position_embeddings == 16  # a shorter context keeps the preset's positions
