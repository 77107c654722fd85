"""Corpus commands: `pybitnet perplexity [MODEL] PATHS...` (MODEL defaults to the built-in model), on this process or on a Ray cluster (`--ray`).

Each document is scored on its own; the corpus figure is total NLL over total scored tokens. A bad
document is a row with an error, not a failed run; the command fails only when no document could be scored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import corpus
from ..errors import InputError
from .app import app
from .model_spec import open_model, split_model
from .options import MODEL_HELP, DtypeOpt, ThreadsOpt, parse_dtype, set_threads

console = Console()
# Past this many documents the table lists only the failed ones; --json/--parquet hold every row.
TABLE_ROWS = 1000


def _documents(paths: List[Path], tokens_file: Optional[Path], text_field: str) -> list[corpus.Document]:
    if not paths and tokens_file is None:
        raise InputError("give the documents: one or more files (text, .jsonl, .parquet) or --tokens-file")
    documents = list(corpus.read_documents(paths, text_field=text_field))
    if tokens_file is not None:
        documents.append(corpus.Document(str(tokens_file), (len(paths), 0), tokens=corpus.read_token_file(tokens_file)))
    return documents


def _score_locally(model_spec: str, documents, *, ctx, stride, dtype, threads, per_token):
    """(time scoring started, result): the model is loaded first, and its loading is not scoring time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    set_threads(threads)
    model = open_model(model_spec, dtype)
    needs_tokenizer = any(d.text is not None for d in documents)
    tokenizer = corpus.open_tokenizer(model_spec) if needs_tokenizer else None
    warning = corpus.context_warning(model, ctx) if ctx is not None else None
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    with Progress(TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("documents", total=len(documents))
        return time.perf_counter(), corpus.score_documents(model, tokenizer, documents, ctx=ctx, stride=stride, per_token=per_token,
                                      progress=lambda _: bar.advance(task))


def _score_on_ray(model_spec: str, paths: List[Path], tokens_file: Optional[Path], *, address, actors,
                  threads_per_actor, ctx, stride, dtype, per_token, text_field) -> corpus.CorpusScore:
    from ..distributed import require_ray, score_corpus

    ray = require_ray()
    if tokens_file is not None and paths:
        raise InputError("with --ray give either files or --tokens-file, not both")
    if tokens_file is None and not paths:
        raise InputError("give the documents: one or more files (text, .jsonl, .parquet) or --tokens-file")
    ids = corpus.read_token_file(tokens_file) if tokens_file is not None else None
    if not ray.is_initialized():
        ray.init(address=address)
    # a token file is one document, shipped as a one-row dataset; files are read by Ray tasks
    dataset = ray.data.from_items([{"id": str(tokens_file), "tokens": ids}]) if ids else [str(p) for p in paths]
    return score_corpus(model_spec, dataset, actors=actors, threads_per_actor=threads_per_actor, ctx=ctx,
                        stride=stride, per_token=per_token, dtype=parse_dtype(dtype), text_field=text_field)


def _print(result: corpus.CorpusScore) -> None:
    shown = result.scores if len(result.scores) <= TABLE_ROWS else [s for s in result.scores if s.error]
    if shown:
        table = Table("document", "tokens", "log-prob sum", "perplexity", "error")
        for s in shown:
            ok = s.error is None
            table.add_row(s.id, str(s.tokens), f"{s.logprob_sum:.4f}" if ok else "", f"{s.perplexity:.4f}" if ok else "",
                          s.error or "")
        console.print(table)
    if len(shown) < len(result.scores):
        console.print(f"{len(result.scores)} documents; only the failed ones are listed (every row: --json/--parquet)")


@app.command()
def perplexity(arguments: Optional[List[str]] = typer.Argument(
                   None, metavar="[MODEL] PATHS...", show_default=False,
                   help="documents: text files (one document each), .jsonl (one per line), .parquet (one per row), "
                        f"after an optional MODEL (default: builtin). MODEL is {MODEL_HELP}"),
               tokens_file: Optional[Path] = typer.Option(None, "--tokens-file", help="one document of token ids: whitespace/comma separated, or a JSON list"),
               ctx: Optional[int] = typer.Option(None, "--ctx", help="window length in tokens [default: the model's context, at most 2048]"),
               stride: Optional[int] = typer.Option(None, "--stride", help="window step (default: ctx)"),
               text_field: str = typer.Option("text", "--text-field", help="field/column holding the text in .jsonl/.parquet"),
               json_out: Optional[Path] = typer.Option(None, "--json", help="write per-document rows and the corpus figure here"),
               parquet_out: Optional[Path] = typer.Option(None, "--parquet", help="write per-document rows here"),
               per_token: bool = typer.Option(False, "--per-token", help="include per-token log-probs in --json/--parquet"),
               use_ray: bool = typer.Option(False, "--ray", help="score on a Ray cluster (pip install \"pybitnet[ray]\")"),
               address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join, e.g. auto (default: a local Ray)"),
               actors: int = typer.Option(2, "--actors", min=1, help="Ray actors, each with its own copy of the model"),
               threads_per_actor: int = typer.Option(1, "--threads-per-actor", min=1, help="torch threads in each Ray actor"),
               dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt):
    """Perplexity of many documents, each scored on its own with sliding windows, and of the whole corpus."""
    model, rest = split_model(list(arguments or []))
    paths = [Path(p) for p in rest]
    if ctx is not None:
        corpus.check_window(ctx, stride)
    for out, suffix in ((json_out, ".json"), (parquet_out, ".parquet")):
        if out is not None and out.suffix.lower() != suffix:
            raise InputError(f"{out}: the output file must end in {suffix}")
    for out in (json_out, parquet_out):  # before any work, not after all of it
        if out is not None:
            corpus.check_writable(out)
    if parquet_out is not None:
        corpus.require_pyarrow()
    start = time.perf_counter()  # on Ray this includes starting the actors: the job's real throughput
    if use_ray:
        result = _score_on_ray(model, paths, tokens_file, address=address, actors=actors,
                               threads_per_actor=threads_per_actor, ctx=ctx, stride=stride, dtype=dtype,
                               per_token=per_token, text_field=text_field)
    else:
        start, result = _score_locally(model, _documents(paths, tokens_file, text_field), ctx=ctx, stride=stride,
                                dtype=dtype, threads=threads, per_token=per_token)
    elapsed = time.perf_counter() - start
    for out in (json_out, parquet_out):
        if out is not None:
            corpus.write_scores(result, out, per_token=per_token)
    _print(result)
    tokens = sum(s.tokens for s in result.scores if s.error is None)
    if result.tokens_scored == 0:
        raise InputError(f"no document could be scored ({result.failed} of {result.documents} failed)")
    console.print(f"perplexity {result.perplexity:.4f}  (nll {result.nll:.4f} nats/token, {result.tokens_scored} tokens "
                  f"scored in {result.windows} windows, {result.documents - result.failed} of {result.documents} "
                  f"documents, {tokens / elapsed:.1f} tokens/s)")
