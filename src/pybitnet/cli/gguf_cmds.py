"""`pybitnet convert MODEL DST`: any model (HF checkpoint, GGUF, Hub repo, synthetic) as GGUF or an HF directory."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CheckpointError, InputError
from .app import app
from .options import MODEL_HELP


@app.command()
def convert(
    src: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP, show_default=False),
    dst: Path = typer.Argument(..., metavar="DST", show_default=False,
                               help="a .gguf file, or a directory for the Hugging Face packed layout"),
    qtype: str = typer.Option("i2_s", "--type", help="GGUF projection type: i2_s (bitnet.cpp), tq2_0, tq1_0, f16 (llama.cpp)"),
    embed_type: str = typer.Option("f16", "--embed-type", help="GGUF embedding and output type: f16, bf16, f32, "
                                    "q8_0, q6_k, q5_k, q4_k, q4_0 (ggml blocks, quantized as llama.cpp does)"),
    force: bool = typer.Option(False, "--force", help="replace DST if it exists"),
) -> None:
    """Write a model as GGUF (DST ending in .gguf) or as a Hugging Face directory, with its tokenizer.

    Never writes over the source; the output appears whole or not at all."""
    from ..loaders import convert as convert_model
    from ..loaders import load_tokenizer
    from ..loaders.gguf import EMBED_TYPES, QTYPES

    if qtype not in QTYPES:
        raise InputError(f"--type must be one of {', '.join(QTYPES)}, got {qtype!r}")
    if embed_type not in EMBED_TYPES:
        raise InputError(f"--embed-type must be one of {', '.join(EMBED_TYPES)}, got {embed_type!r}")
    to_gguf = dst.suffix.lower() == ".gguf"
    if to_gguf and dst.is_dir():
        raise InputError(f"{dst} is a directory; give the output file, e.g. {dst / 'model.gguf'}")
    if force and dst.is_dir() and not (dst / "config.json").is_file() and any(dst.iterdir()):
        # --force replaces a model directory, never a directory of other files (a home, a project)
        raise InputError(f"{dst} is a directory that holds no model (no config.json); refusing to replace it")
    written = convert_model(src, dst, qtype=qtype, embed_type=embed_type, overwrite=force)
    size = written.stat().st_size if written.is_file() else sum(p.stat().st_size for p in written.rglob("*") if p.is_file())
    try:
        load_tokenizer(written)
        vocab = "tokenizer included"
    except CheckpointError:
        vocab = "no tokenizer"
    typer.echo(f"wrote {written} ({qtype if to_gguf else 'Hugging Face packed'}, {size / 2**20:.1f} MiB, {vocab})")
