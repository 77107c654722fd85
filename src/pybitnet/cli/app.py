"""The typer application that every command module registers on, and `main`, which runs it.

Whatever a user can get wrong ends as one line on stderr and a non-zero exit, never a traceback:
our own errors and bad options exit 1 and 2, Ctrl-C exits 130 (the shell's code for SIGINT).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Optional

import typer

from .. import __version__
from ..errors import PyBitNetError

MAX_MESSAGE_CHARS = 400  # an error quoting a whole input file is no help; the start of it says enough
INTERRUPTED_EXIT_CODE = 130
# Recent typer ships its own copy of click: take the exception classes from typer, whichever copy it uses.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    name="pybitnet",
    help="Fast, exact inference for BitNet b1.58 (ternary) language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: "[default: 128]" and token lists stay as written
)


def _print_version(value: bool) -> None:
    if value:
        print(f"pybitnet {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                                     help="print the version and exit")) -> None:
    """Fast, exact inference for BitNet b1.58 (ternary) language models."""


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` on one line, cut to `limit` characters with a note of how much was left out."""
    flat = " ".join(str(message).split())
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit]}... ({len(flat) - limit} more characters)"


def _fail(message: str, code: int) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def main(args: list[str] | None = None) -> None:
    """The `pybitnet` entry point."""
    try:
        code = app(args=args, prog_name="pybitnet", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):  # older typer: click turns Ctrl-C into Abort
        code = INTERRUPTED_EXIT_CODE
    except _CLICK_ERROR as err:  # a bad option or argument, found before any work
        if type(err).__name__ == "NoArgsIsHelpError":  # `pybitnet` alone: the help is the answer
            err.show()
            sys.exit(0)
        hint = f" (see: {err.ctx.command_path} --help)" if getattr(err, "ctx", None) is not None else ""
        _fail(err.format_message() + hint, err.exit_code)
    except PyBitNetError as err:
        _fail(str(err), 1)
    except MemoryError:
        _fail("out of memory: try a smaller model, batch or context", 1)
    except OSError as err:
        if err.errno == errno.EPIPE:  # output piped into `head` that has closed: not an error
            sys.stderr.close()
            sys.exit(0)
        reason = err.strerror or str(err)
        _fail(f"{reason}: {err.filename}" if err.filename else reason, 1)
    except Exception as err:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("PYBITNET_TRACEBACK"):
            raise
        _fail(f"internal error {type(err).__name__}: {err} (set PYBITNET_TRACEBACK=1 to see where)", 1)
    if code == INTERRUPTED_EXIT_CODE:  # Ctrl-C (typer returns 130 for it): say so, briefly
        print("interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
