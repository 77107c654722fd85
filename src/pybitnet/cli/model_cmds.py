"""Commands on a model: info, score, perplexity, bench."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..errors import InputError
from .app import app

console = Console()

ThreadsOpt = typer.Option(None, "--threads", "-t", help="torch threads (default: all cores)")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (fast) or float64 (exactness checks)")
BackendOpt = typer.Option("auto", "--backend", help="kernel backend: auto, reference, int8")


def set_threads(threads: Optional[int]) -> int:
    n = threads or os.cpu_count() or 1
    if n < 1:
        raise InputError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}
    if name not in dtypes:
        raise InputError(f"--dtype must be float32 or float64, got {name!r}")
    return dtypes[name]


def open_model(model: str, dtype: str = "float32", backend: str = "auto"):
    """A checkpoint path, or `synthetic:PRESET[:LAYERS]` for a random model of that shape."""
    from .. import load, synthetic

    if model.startswith("synthetic:"):
        _, name, *rest = model.split(":")
        layers = int(rest[0]) if rest else None
        return synthetic.random_model(name, seed=0, num_layers=layers, dtype=parse_dtype(dtype), backend=backend)
    return load(model, dtype=parse_dtype(dtype), backend=backend)


def parse_token_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InputError("--tokens is empty")
    return ids


@app.command()
def info(model: str = typer.Argument(..., help="HF directory, .gguf file, or synthetic:PRESET[:LAYERS]"),
         dtype: str = DtypeOpt):
    """Architecture, sizes, dtypes and memory of a model."""
    m = open_model(model, dtype)
    c = m.config
    ternary_bytes = sum(b.nbytes for name, b in m.named_buffers() if name.endswith("ternary_weights"))
    float_bytes = sum(p.nbytes for p in m.parameters())
    table = Table(title=f"pybitnet model: {model}", show_header=False)
    rows = [
        ("architecture", c.architecture), ("source", json.dumps(getattr(m, "source", {"path": "synthetic"}))),
        ("layers", c.num_layers), ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"),
        ("heads / kv heads / head dim", f"{c.num_heads} / {c.num_kv_heads} / {c.head_dim}"),
        ("vocab", c.vocab_size), ("activation", c.hidden_act), ("rope theta", c.rope_theta),
        ("tied embeddings", c.tie_word_embeddings), ("sub-norms", c.sub_norms),
        ("max positions", c.max_position_embeddings),
        ("ternary parameters", f"{c.ternary_parameters():,}"), ("float parameters", f"{c.float_parameters():,}"),
        ("compute dtype", str(m.dtype).replace("torch.", "")),
        ("embedding dtype", str(m.embed_tokens.dtype).replace("torch.", "")),
        ("ternary weights (int8)", f"{ternary_bytes / 2**20:,.1f} MiB"),
        ("float weights", f"{float_bytes / 2**20:,.1f} MiB"),
        ("KV cache per token", f"{2 * c.num_layers * c.kv_size * m.dtype.itemsize / 1024:,.1f} KiB"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def _model_tokens(model_path: str, tokens: Optional[str], text: Optional[str]) -> list[int]:
    """Token ids from --tokens, or --text through the model's own tokenizer (BOS added)."""
    if (tokens is None) == (text is None):
        raise InputError("give exactly one of --tokens (ids) or --text")
    if tokens is not None:
        return parse_token_list(tokens)
    from ..tokenizer import load_tokenizer

    if not text.strip():
        raise InputError("--text is empty")
    return load_tokenizer(model_path).encode(text)


@app.command()
def score(model: str = typer.Argument(..., help="HF directory, .gguf file, or synthetic:PRESET[:LAYERS]"),
          tokens: Optional[str] = typer.Option(None, "--tokens", help="comma-separated token ids"),
          text: Optional[str] = typer.Option(None, "--text", help="text, tokenized with the model's tokenizer"),
          dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt, as_json: bool = typer.Option(False, "--json")):
    """Per-position log-probs of the given tokens or text (full-sequence pass)."""
    from ..evaluate import token_logprobs

    set_threads(threads)
    ids = _model_tokens(model, tokens, text)
    m = open_model(model, dtype)
    logp = token_logprobs(m, ids).tolist()
    if as_json:
        print(json.dumps({"tokens": ids, "logprobs": logp, "total": sum(logp)}))
        return
    table = Table("position", "token", "log p")
    for i, (tok, lp) in enumerate(zip(ids[1:], logp), start=1):
        table.add_row(str(i), str(tok), f"{lp:.4f}")
    console.print(table)
    console.print(f"total log p = {sum(logp):.4f} over {len(logp)} tokens")


@app.command()
def bench(layers: int = typer.Option(30, "--layers", help="layers of the 2B-4T-shaped model (30 = the real depth)"),
          threads: Optional[int] = ThreadsOpt, backend: str = BackendOpt,
          json_path: Optional[Path] = typer.Option(None, "--json", help="write machine-readable results here"),
          markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="write a markdown table here"),
          plot_path: Optional[Path] = typer.Option(None, "--plot", help="write a PNG plot of ms/token vs T here"),
          sections: str = typer.Option(",".join(("full_vs_step", "scaling", "memory", "decode", "gemm_peak")), "--sections",
                                       help="comma-separated subset of: full_vs_step, scaling, memory, decode, gemm_peak"),
          quick: bool = typer.Option(False, "--quick", help="full vs step at T=64,128 only, scaling to T=1024")):
    """Benchmark the full-sequence path against step-by-step on the built-in 2B-4T-shaped model."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .. import bench as suite
    from ..kernels import check_backend

    check_backend(backend)
    if layers < 1:
        raise InputError(f"--layers must be >= 1, got {layers}")
    chosen = tuple(s.strip() for s in sections.split(",") if s.strip())
    unknown = [s for s in chosen if s not in suite.SECTIONS]
    if unknown:
        raise InputError(f"unknown --sections {unknown}; choose from {', '.join(suite.SECTIONS)}")
    n = set_threads(threads)
    kwargs = {"full_vs_step_t": (64, 128), "scaling_t": (128, 256, 512, 1024)} if quick else {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def progress(msg: str) -> None:
            if msg.startswith("WARNING"):
                console.print(f"[yellow]{msg}[/yellow]")
            bar.update(task, description=msg)

        results = suite.run_suite(layers=layers, threads=n, sections=chosen, backend=backend, progress=progress, **kwargs)
    suite.save(results, str(json_path) if json_path else None, str(markdown_path) if markdown_path else None,
               str(plot_path) if plot_path else None)
    console.print(suite.markdown(results))
