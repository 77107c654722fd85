"""What `pybitnet train` refuses and how it fails: checkpoints that would run code or do not load.
Models are the tiny preset trained for a few steps.
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from pybitnet.train.trainer import CHECKPOINT

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


def _error_line(err: str) -> str:
    """The last line of stderr (a progress bar may come before it) and a check that it is the only error."""
    assert "Traceback" not in err and "internal error" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    return last


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
