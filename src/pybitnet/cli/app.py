"""The typer application that every command module registers on."""

import typer

app = typer.Typer(
    name="pybitnet",
    help="Fast, exact inference for BitNet b1.58 (ternary) language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
