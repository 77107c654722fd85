"""Command line: `pybitnet info | score | perplexity | bench | convert | generate | chat`."""

from __future__ import annotations

import sys

from ..errors import PyBitNetError
from .app import app
from . import model_cmds, gguf_cmds, text_cmds  # noqa: E402,F401  (each registers its commands on `app`)
from . import corpus_cmds  # noqa: E402,F401
from . import train_cmds  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except PyBitNetError as err:  # a clear message and a non-zero exit, never a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
