"""Helpers shared by the test files: running the command line, and small models with a tokenizer.

The tests directory is on sys.path (pytest's rootdir-relative imports), so helper modules such as
rules.py and reference_numpy.py are imported by name; fixtures live here.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliRun:
    code: int
    out: str
    err: str


def run_pybitnet(*args: str, stdin: str | None = None, timeout: float = 300) -> CliRun:
    """`python -m pybitnet ARGS` in a fresh process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "pybitnet", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)
    return CliRun(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `pybitnet ARGS` in this process through the real entry point: cli(*args, stdin=...) -> CliRun."""
    import io

    from pybitnet.cli import main

    def run(*args: str, stdin: str | None = None) -> CliRun:
        monkeypatch.setattr(sys, "argv", ["pybitnet", *args])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return run


def write_text_checkpoint(directory: Path, **config_overrides) -> Path:
    """A tiny HF checkpoint with a trained byte-level BPE tokenizer and a chat template."""
    from test_tokenizer_helpers import write_tiny_checkpoint

    return write_tiny_checkpoint(directory, **config_overrides)


def gguf_metadata_from_hf(tokenizer_json: Path) -> dict:
    """The tokenizer.ggml.* keys a GGUF file carries for the tokenizer in `tokenizer_json`."""
    from test_tokenizer_helpers import gguf_metadata_from_hf as from_hf

    return from_hf(tokenizer_json)


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory) -> Path:
    """One tiny HF checkpoint with a tokenizer for the whole test run (read-only: tests must not modify it)."""
    return write_text_checkpoint(tmp_path_factory.mktemp("text-checkpoint"))
