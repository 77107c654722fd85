"""Options that several commands share, and the parsing of their values into what the library takes.

Numeric ranges are checked by typer (`min=`/`max=`) so a bad value is refused before any model loads.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Callable, Optional

import torch
import typer

from .. import kernels
from ..config import PRESETS
from ..errors import InputError
from ..sampling import SamplingParams

MODEL_HELP = (f"builtin (the small model shipped with pybitnet), a Hugging Face checkpoint directory, a .gguf file, "
              f"a Hugging Face repo id, or synthetic:PRESET[:LAYERS] for a random model of a preset's shape "
              f"(presets: {', '.join(PRESETS)})")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_TOKEN_ID = 2**63 - 1  # token ids travel as int64

ModelArg = typer.Argument("builtin", help=MODEL_HELP, metavar="[MODEL]")
MAX_THREADS = 1024  # more would only ask the OS for threads no machine here has cores for
ThreadsOpt = typer.Option(None, "--threads", "-t", min=1, max=MAX_THREADS, help="torch threads (default: all cores)")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (fast) or float64 (exactness checks)")
LmHeadOpt = typer.Option("exact", "--lm-head",
                         help="output head: exact (the table as the file holds it), int8 (lossy int8 activations; "
                              "on a GGUF block table, against its blocks), or q8_0, q6_k, q5_k, q4_k, q4_0 (a float "
                              "table quantized to ggml blocks at load)")
BackendOpt = typer.Option("auto", "--backend", help=f"kernel backend: auto, {', '.join(kernels.BACKENDS)}")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


def set_threads(threads: Optional[int]) -> int:
    """Set torch's thread count (None: one per core); returns it."""
    count = (os.cpu_count() or 1) if threads is None else threads
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"--threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(count)
    return count


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"--dtype must be float32 or float64, got {name!r}")
    return DTYPES[name]


def parse_token_ids(text: str, source: str = "--tokens") -> list[int]:
    """Token ids written as integers separated by commas or whitespace, or as a JSON list of integers.

    Errors quote the offending item only (a token file can be megabytes)."""
    stripped = text.strip()
    from_json = stripped.startswith("[")
    if from_json:
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise InputError(f"{source}: not a JSON list of token ids ({err.msg} at line {err.lineno} "
                             f"column {err.colno})") from None
        if not isinstance(items, list):
            raise InputError(f"{source}: a JSON token file must hold one list of integers")
    else:
        items = stripped.replace(",", " ").split()
    ids = []
    for position, item in enumerate(items):
        if from_json:
            if isinstance(item, bool) or not isinstance(item, int):
                raise InputError(f"{source}: item {position} is not an integer: {json.dumps(item)[:40]}")
            value = item
        else:
            try:
                value = int(item)
            except ValueError:
                raise InputError(f"{source} must be comma-separated integers; item {position} is "
                                 f"{item[:40]!r}") from None
        if not 0 <= value <= MAX_TOKEN_ID:
            raise InputError(f"{source}: token id {str(value)[:40]} at item {position} is out of range "
                             f"(ids are >= 0)")
        ids.append(value)
    if not ids:
        raise InputError(f"{source} holds no token ids")
    return ids


def check_text(value: str, what: str) -> str:
    """`value` if it is text a tokenizer can take; InputError naming `what` for bytes that are not UTF-8
    (a terminal or a shell can pass them in arguments; Python keeps them as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{what} is not valid UTF-8 text (a byte that decodes to no character at "
                         f"character {err.start})") from None
    return value


# -- sampling: one definition of the options, for every command that samples -----------------------------------

_SAMPLING_OPTIONS = {
    "temperature": (float, typer.Option(0.8, "--temperature", help="0 = greedy (deterministic)")),
    "top_k": (int, typer.Option(40, "--top-k", help="keep the k most likely tokens (0 = off)")),
    "top_p": (float, typer.Option(0.95, "--top-p", help="keep the most likely tokens up to this probability mass "
                                                         "(1 = off)")),
    "min_p": (float, typer.Option(0.05, "--min-p", help="drop tokens below this fraction of the top probability "
                                                         "(0 = off)")),
    "repeat_penalty": (float, typer.Option(1.0, "--repeat-penalty", help="penalise tokens already seen (1 = off)")),
    "seed": (Optional[int], typer.Option(None, "--seed", min=0, max=MAX_SEED,
                                         help="random seed for sampling (same seed, same text)")),
}


def sampling_options(command: Callable) -> Callable:
    """Give a command the sampling options; it receives them checked, as `sampling: SamplingParams` and `seed`.

    The command declares `sampling` and `seed` parameters; the options replace them in its signature."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name not in ("sampling", "seed")]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, (kind, option) in _SAMPLING_OPTIONS.items()]

    @functools.wraps(command)
    def with_sampling(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in _SAMPLING_OPTIONS}
        kwargs["seed"] = values.pop("seed")
        kwargs["sampling"] = SamplingParams(  # bad values fail here, before any model loads
            temperature=values["temperature"], top_k=values["top_k"], top_p=values["top_p"], min_p=values["min_p"],
            repetition_penalty=values["repeat_penalty"])
        return command(*args, **kwargs)

    with_sampling.__signature__ = signature.replace(parameters=kept + added)
    return with_sampling
