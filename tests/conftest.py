"""Fixtures shared by the test files: running the command line, and small models with a tokenizer.

Test files take these as fixtures and never import each other; plain helper modules (rules.py,
reference_numpy.py) are imported by name, as the tests directory is on sys.path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest


@dataclass
class CliRun:
    code: int
    out: str
    err: str


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is faster than two, and far faster on a machine shared with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def write_text_checkpoint():
    """write_text_checkpoint(directory, **overrides) -> directory: a tiny HF checkpoint with a trained byte-level
    BPE tokenizer and a chat template (overrides: tied, max_position_embeddings, num_layers, seed)."""
    from test_tokenizer_helpers import write_tiny_checkpoint

    return write_tiny_checkpoint


@pytest.fixture(scope="session")
def gguf_metadata_from_hf():
    """gguf_metadata_from_hf(tokenizer_json) -> the tokenizer.ggml.* keys a GGUF file carries for that tokenizer."""
    from test_tokenizer_helpers import gguf_metadata_from_hf as from_hf

    return from_hf
