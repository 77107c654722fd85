"""Long phases show progress on stderr, never on stdout: building a synthetic model layer by layer
(`info`, `score`), and the benchmark's steps and model build (`bench`)."""

from __future__ import annotations

import pytest
import torch

from pybitnet import preset, synthetic
from pybitnet.cli import progress


@pytest.fixture
def every_update_printed(monkeypatch):
    """Plain lines (stderr is not a terminal here) from the first update on, none skipped: the tiny
    models build in milliseconds, far below the real thresholds."""
    monkeypatch.setattr(progress, "FIRST_LINE_AFTER", 0.0)
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)


def test_random_weights_report_every_value_drawn_and_stay_the_same_weights():
    config = preset("tiny").replace(tie_word_embeddings=False)
    calls = []
    reported = synthetic.random_weights(config, 4, progress=lambda done, total, part: calls.append((done, total, part)))
    total = sum(t.numel() if isinstance(t, torch.Tensor) else t.values.numel() for t in reported.values())
    assert all(t == total for _, t, _ in calls) and calls[-1][0] == total
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)  # it only moves forward
    parts = list(dict.fromkeys(p for _, _, p in calls))
    assert parts == ["embed_tokens", "norm", "lm_head", "layer 1/2", "layer 2/2"]
    plain = synthetic.random_weights(config, 4)  # reporting draws nothing: the same weights
    for name, value in plain.items():
        other = reported[name]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value.beta == other.beta and torch.equal(value.values, other.values), name


def test_reporting_progress_reaches_load_and_ends_with_the_block():
    import pybitnet

    seen = []
    with synthetic.reporting_progress(lambda done, total, part: seen.append(part)):
        pybitnet.load("synthetic:tiny:1")
    assert "layer 1/1" in seen
    count = len(seen)
    pybitnet.load("synthetic:tiny:1")
    assert len(seen) == count


@pytest.mark.parametrize("command", [("info",), ("score", "--tokens", "1,2,3", "--threads", "1")])
def test_building_a_synthetic_model_shows_progress_on_stderr_only(cli, every_update_printed, command):
    done = cli(command[0], "synthetic:tiny", *command[1:])
    assert done.code == 0, done.err
    assert "building synthetic:tiny: embed_tokens" in done.err and "building synthetic:tiny: layer 2/2" in done.err
    assert "%" in done.err
    assert "building" not in done.out and "%" not in done.out
    assert ("ternary parameters" if command[0] == "info" else "total log p") in done.out


def test_loading_a_checkpoint_is_named_on_stderr(cli, every_update_printed, tmp_path, write_text_checkpoint):
    path = write_text_checkpoint(tmp_path / "m")
    done = cli("info", str(path))
    assert done.code == 0, done.err
    assert f"loading {path}" in done.err and f"loading {path}" not in done.out


def test_quick_phases_print_nothing(cli):
    """Below FIRST_LINE_AFTER nothing is printed: a tiny model's info leaves stderr empty, and an error
    stays the one line it was."""
    assert cli("info", "synthetic:tiny").err == ""
    done = cli("info", "synthetic:tiny:x")
    assert done.code == 1 and len(done.err.splitlines()) == 1
