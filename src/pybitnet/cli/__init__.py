"""The `pybitnet` command: each command module below registers its commands on `app` (see `pybitnet --help`)."""

from __future__ import annotations

from .app import app, main  # noqa: F401  (main: the `pybitnet` entry point)
from . import model_cmds, bench_cmds, gguf_cmds, text_cmds  # noqa: E402,F401  (each registers its commands on `app`)
from . import train_cmds  # noqa: E402,F401
from . import serve_cmds  # noqa: E402,F401
from . import corpus_cmds  # noqa: E402,F401
from . import eval_cmds  # noqa: E402,F401
