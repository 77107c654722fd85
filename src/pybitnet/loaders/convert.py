"""`convert`: any MODEL spec written as a GGUF file or a Hugging Face directory, with its tokenizer.

Never writes over what it reads: the destination may not be the source, a file the source's loader
reads (config.json, the safetensors shards, the tokenizer files), a name the loader would pick up
(another `*.safetensors` in the directory), or a directory holding any of them. Anything else goes,
next to the model included (`convert DIR DIR/model.gguf`). An existing destination is replaced only
with `overwrite=True`, and only once the new one is complete (a temporary name, then os.replace), so a
failed conversion leaves the old destination as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from ..quant.ggml_blocks import QuantizedTable
from .load import load_tokenizer, load_weights
from .spec import resolve_model_spec


def convert(source: str | os.PathLike, destination: str | os.PathLike, *, qtype: str = "i2_s",
            embed_type: str = "f16", overwrite: bool = False) -> Path:
    """Write the model `source` names (an HF directory, a .gguf file, `synthetic:PRESET[:LAYERS]` or a Hub
    repo id) to `destination`: a `.gguf` file with projections as `qtype` (i2_s, tq2_0, tq1_0, f16) and the
    embedding as `embed_type` (f16, bf16, f32, q8_0, q6_k, q5_k, q4_k, q4_0), or for any other name a Hugging Face directory in the packed
    layout transformers loads. The tokenizer goes along when the source has one. Returns `destination`."""
    from ..tokenizer import gguf_tokenizer_metadata, save_tokenizer
    from .gguf import EMBED_TYPES, QTYPES, write_gguf
    from .gguf_file import GGUFReader
    from .hf import save_hf

    destination = Path(destination)
    to_gguf = destination.suffix.lower() == ".gguf"
    if to_gguf and qtype not in QTYPES:
        raise InputError(f"unknown GGUF type {qtype!r}; choose one of: {', '.join(QTYPES)}")
    if to_gguf and embed_type not in EMBED_TYPES:
        raise InputError(f"unknown embedding type {embed_type!r}; choose one of: {', '.join(EMBED_TYPES)}")
    model = resolve_model_spec(source)
    _check_destination(destination, model.path, overwrite, to_gguf, model.kind)
    config, weights, _ = load_weights(source)
    gguf_fields = {}
    if model.kind == "gguf":
        with GGUFReader(model.path) as reader:  # keep the stored types of every tokenizer key
            gguf_fields = {k: v for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    # a model without a tokenizer converts without one; a broken tokenizer is an error, not dropped
    has_tokenizer = {"hf": model.path is not None and (model.path / "tokenizer.json").is_file(),
                     "gguf": getattr(gguf_fields.get("tokenizer.ggml.model"), "value", "no_vocab") != "no_vocab",
                     "synthetic": True}[model.kind]
    tokenizer = load_tokenizer(source) if has_tokenizer else None
    if to_gguf:
        if model.kind == "gguf":
            metadata = gguf_fields
        else:
            metadata = gguf_tokenizer_metadata(tokenizer, config.vocab_size) if tokenizer is not None else None
        write_gguf(destination, config, weights, qtype, metadata or None, embed_type=embed_type)  # atomic
        return destination
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        # GGUF block tables kept as stored go to safetensors as their float32 values
        weights = {k: w.dequantize() if isinstance(w, QuantizedTable) else w for k, w in weights.items()}
        # float tensors are written in the one dtype that holds them all exactly (transformers wants one)
        floats = {w.dtype for w in weights.values() if isinstance(w, torch.Tensor)}
        save_hf(staging, config, weights, float_dtype=floats.pop() if len(floats) == 1 else torch.float32)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
        _replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


# files of a Hugging Face directory that loading it reads besides the shards (loaders/hf.py, tokenizer.py)
HF_READ_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json")


def source_files(source: Path, kind: str) -> list[Path]:
    """The files loading `source` reads: a .gguf file itself; for a directory its config, shard index,
    shards and tokenizer files (those that exist, and the fixed names whether or not they do)."""
    if kind != "hf":
        return [source]
    from .hf import _shard_files

    try:
        shards = _shard_files(source)
    except CheckpointError:  # the load reports it; here only what exists matters
        shards = []
    return [source / name for name in HF_READ_FILES] + shards


def _overwrites_source(destination: Path, source: Path, kind: str) -> bool:
    """Whether writing `destination` (a file, or a directory replaced whole) would change what `source` is."""
    def forms(path: Path) -> set[Path]:  # as named and with links resolved (the hub cache links to blobs)
        return {Path(os.path.abspath(path)), path.resolve()}

    dst = forms(destination)
    read = [source, *source_files(source, kind)]
    for path in read:
        for form in forms(path):
            if form in dst or any(d in form.parents for d in dst):  # the file itself, or a directory holding it
                return True
    # a new *.safetensors beside the shards would be read as one more shard
    in_source = any(d.parent in forms(source) for d in dst) if kind == "hf" else False
    return in_source and destination.name.lower().endswith(".safetensors")


def _check_destination(destination: Path, source: Path | None, overwrite: bool, to_gguf: bool,
                       kind: str = "hf") -> None:
    parent = destination.parent
    if not parent.is_dir():
        raise InputError(f"{destination}: the directory {parent} does not exist")
    if source is not None and _overwrites_source(destination, source, kind):
        raise InputError(f"{destination}: would write over the source {source} (a file it reads, or a directory "
                         "holding it); choose another name")
    if destination.exists():
        if to_gguf and destination.is_dir():
            raise InputError(f"{destination}: is a directory, not a .gguf file name")
        if not to_gguf and not destination.is_dir():
            raise InputError(f"{destination}: exists and is not a directory (a .gguf destination needs the suffix)")
        if not overwrite:
            raise InputError(f"{destination}: exists; pass overwrite=True (--force) to replace it")


def _replace_directory(new: Path, destination: Path) -> None:
    """Put the complete directory `new` at `destination`, replacing what was there."""
    if not destination.exists():
        os.replace(new, destination)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
    os.replace(destination, old / destination.name)
    try:
        os.replace(new, destination)
    except BaseException:
        os.replace(old / destination.name, destination)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
