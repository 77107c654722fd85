"""`pybitnet convert MODEL DST --type i2_s|tq2_0|tq1_0|f16`: any model (HF checkpoint, GGUF, synthetic) to GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from ..errors import CheckpointError, InputError
from .app import app
from .options import MODEL_HELP

# llama.cpp token types (llama-vocab.h): what its converter writes for a byte-level BPE vocab
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def hf_tokenizer_metadata(directory: Path, vocab_size: int) -> dict[str, Any] | None:
    """tokenizer.ggml.* keys for a byte-level BPE `tokenizer.json` (LLaMA-3 / 2B-4T style), padded to
    the model's vocab_size as llama.cpp's converter pads; None when the directory has no tokenizer.

    The pre-tokenizer name (`tokenizer.ggml.pre`) is left out, as in the official 2B-4T GGUF:
    llama.cpp identifies it by hashing tokenizer output, which needs the original tokenizer here.
    """
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE":
            raise CheckpointError(f"{path}: only byte-level BPE tokenizers convert to GGUF, got {model.get('type')!r}")
        tokens: list[str | None] = [None] * vocab_size
        types = [TOKEN_NORMAL] * vocab_size
        for token, token_id in model["vocab"].items():
            if token_id < vocab_size:
                tokens[token_id] = token
        for added in spec.get("added_tokens", []):
            if added["id"] < vocab_size:
                tokens[added["id"]] = added["content"]
                types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({err!r})") from None
    for token_id, token in enumerate(tokens):
        if token is None:  # the model's vocab is larger than the tokenizer's: unused padding ids
            tokens[token_id], types[token_id] = f"[PAD{token_id}]", TOKEN_UNUSED
    metadata: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        tok_config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(tok_config.get("chat_template"), str):
            metadata["tokenizer.chat_template"] = tok_config["chat_template"]
        if isinstance(tok_config.get("add_bos_token"), bool):
            metadata["tokenizer.ggml.add_bos_token"] = tok_config["add_bos_token"]
    return metadata


def check_destination(dst: Path, src: Path | None, force: bool) -> None:
    """InputError unless `dst` names a file we may write: never an input of the conversion, an existing file only
    with --force, never a directory, and in a directory that exists."""
    if dst.is_dir():
        raise InputError(f"{dst} is a directory; give the output file, e.g. {dst / 'model.gguf'}")
    if not dst.parent.is_dir():
        raise InputError(f"cannot write {dst}: no such directory {dst.parent}")
    if src is not None and src.exists():
        inside_source = src.is_dir() and dst.resolve().is_relative_to(src.resolve())
        if (dst.exists() and inside_source) or (src.is_file() and dst.exists() and os.path.samefile(src, dst)):
            raise InputError(f"{dst} is part of the source model {src}: write the output somewhere else")
    if dst.exists() and not force:
        raise InputError(f"{dst} exists; pass --force to replace it")


@app.command()
def convert(
    src: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP, show_default=False),
    dst: Path = typer.Argument(..., metavar="DST", help="the .gguf file to write", show_default=False),
    qtype: str = typer.Option("i2_s", "--type", help="projection type: i2_s (bitnet.cpp), tq2_0, tq1_0, f16 (llama.cpp)"),
    embed_type: str = typer.Option("f16", "--embed-type", help="embedding type: f16, bf16, f32"),
    force: bool = typer.Option(False, "--force", help="replace DST if it exists"),
) -> None:
    """Write a model as GGUF, with its tokenizer when it has one (the file is written whole or not at all)."""
    from ..loaders import load_weights
    from ..loaders.gguf import EMBED_TYPES, QTYPES, write_gguf
    from ..loaders.gguf_file import GGUFReader

    if qtype not in QTYPES:
        raise InputError(f"--type must be one of {', '.join(QTYPES)}, got {qtype!r}")
    if embed_type not in EMBED_TYPES:
        raise InputError(f"--embed-type must be one of {', '.join(EMBED_TYPES)}, got {embed_type!r}")
    source = Path(src) if not src.startswith("synthetic:") else None
    check_destination(dst, source, force)
    config, weights, _ = load_weights(src)
    if source is not None and source.is_dir():
        tokenizer = hf_tokenizer_metadata(source, config.vocab_size)
    elif source is not None and source.is_file():
        with GGUFReader(source) as reader:  # keep the stored types (GGUFValue) of every tokenizer key
            tokenizer = {k: v for k, v in reader.fields.items() if k.startswith("tokenizer.")}
        tokenizer = tokenizer if tokenizer.get("tokenizer.ggml.model", None) is not None else None
    else:
        tokenizer = None
    write_gguf(dst, config, weights, qtype, tokenizer, embed_type=embed_type)
    vocab = "no tokenizer (no_vocab)" if tokenizer is None else "tokenizer included"
    typer.echo(f"wrote {dst} ({qtype}, {config.num_layers} layers, {dst.stat().st_size / 2**20:.1f} MiB, {vocab})")
