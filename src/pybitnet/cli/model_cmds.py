"""Commands on a model: info and score."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import InputError
from ..quant.ggml_blocks import QuantizedTable
from .app import app
from .model_spec import SYNTHETIC_PREFIX, open_model, open_tokenizer
from .progress import StderrProgress
from .options import (BackendOpt, DtypeOpt, ModelArg, ThreadsOpt, check_text, parse_dtype, parse_token_ids,  # noqa: F401
                      set_threads)  # (BackendOpt, parse_dtype: other command modules import them from here too)

console = Console()


def open_model_showing_progress(spec: str, dtype: str):
    """open_model, with its progress on stderr: a synthetic model's weights as they are drawn (layer by
    layer: the 2B-4T shape takes minutes on a busy machine), any other model as `loading MODEL` with the
    time it has taken."""
    from .. import synthetic

    with StderrProgress() as shown:
        if not spec.startswith(SYNTHETIC_PREFIX):
            shown.update(f"loading {spec}")

        def drawn(done: int, total: int, part: str) -> None:
            shown.update(f"building {spec}: {part}", done, total)

        with synthetic.reporting_progress(drawn):
            return open_model(spec, dtype)


@app.command()
def info(model: str = ModelArg, dtype: str = DtypeOpt):
    """Architecture, sizes, dtypes and memory of a model."""
    m = open_model_showing_progress(model, dtype)
    c = m.config
    ternary_bytes = sum(b.nbytes for name, b in m.named_buffers() if name.endswith("ternary_weights"))
    tables = [t for t in m.modules() if isinstance(t, QuantizedTable)]  # GGUF block tables kept as stored
    float_bytes = sum(p.nbytes for p in m.parameters()) + sum(t.nbytes for t in tables)
    table = Table(title=f"pybitnet model: {model}", show_header=False)
    rows = [
        ("architecture", c.architecture), ("source", json.dumps(getattr(m, "source", {"path": model}))),
        ("layers", c.num_layers), ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
        ("heads / kv heads / head dim", f"{c.num_heads} / {c.num_kv_heads} / {c.head_dim}"),
        ("vocab", c.vocab_size), ("activation", c.hidden_act), ("rope theta", c.rope_theta),
        ("tied embeddings", c.tie_word_embeddings), ("sub-norms", c.sub_norms),
        ("max positions", c.max_position_embeddings),
        ("ternary parameters", f"{c.ternary_parameters():,}"), ("float parameters", f"{c.float_parameters():,}"),
        ("compute dtype", str(m.dtype).replace("torch.", "")),
        ("embedding dtype", getattr(m.embed_tokens, "type_name", None) or str(m.embed_tokens.dtype).replace("torch.", "")),
        ("ternary weights in memory", f"{ternary_bytes / 2**20:,.1f} MiB "
                                      f"({8 * ternary_bytes / max(c.ternary_parameters(), 1):.1f} bits each)"),
        ("float weights", f"{float_bytes / 2**20:,.1f} MiB"),
        ("KV cache per token", f"{2 * c.num_layers * c.kv_size * m.dtype.itemsize / 1024:,.1f} KiB"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def score(model: str = ModelArg,
          tokens: Optional[str] = typer.Option(None, "--tokens", help="comma-separated token ids"),
          text: Optional[str] = typer.Option(None, "--text", help="text, tokenized with the model's tokenizer"),
          dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt, as_json: bool = typer.Option(False, "--json")):
    """Per-position log-probs of the given tokens or text (full-sequence pass, within the model's context)."""
    from ..evaluate import token_logprobs

    if (tokens is None) == (text is None):
        raise InputError("give exactly one of --tokens (ids) or --text")
    if text is not None and not check_text(text, "--text").strip():
        raise InputError("--text is empty")
    ids = parse_token_ids(tokens) if tokens is not None else None
    set_threads(threads)
    m = open_model_showing_progress(model, dtype)
    if ids is None:
        ids = open_tokenizer(model).encode(text)  # BOS added, as the model saw text in training
    context = m.config.max_position_embeddings
    if len(ids) > context:
        raise InputError(f"{len(ids)} tokens but the model's context is {context} (max_position_embeddings): "
                         f"positions past it score meaningless numbers; score at most {context} tokens, "
                         f"or use `pybitnet perplexity`, which slides a window over long text")
    if len(ids) < 2:
        raise InputError("scoring needs at least 2 tokens: the first one is only context")
    logp = token_logprobs(m, ids).tolist()
    if as_json:
        print(json.dumps({"tokens": ids, "logprobs": logp, "total": sum(logp)}))
        return
    table = Table("position", "token", "log p")
    for i, (tok, lp) in enumerate(zip(ids[1:], logp), start=1):
        table.add_row(str(i), str(tok), f"{lp:.4f}")
    console.print(table)
    console.print(f"total log p = {sum(logp):.4f} over {len(logp)} tokens")
