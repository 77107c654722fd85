"""Corpus scoring on Ray Data: the same per-document numbers as `pybitnet.corpus`, spread over an actor pool.

The pipeline:
1. documents: a `ray.data.Dataset` with "id" and "text" (or "tokens") columns, or files (text / JSONL /
   parquet, read by `corpus.file_documents` in Ray tasks, one task per file, so ids and errors match a
   local run);
2. `map_batches(DocumentScorer, compute=ActorPoolStrategy(size=actors))`: each actor loads the model and
   tokenizer once, sets its torch threads, and scores whole documents with `corpus.score_document`;
3. the per-document rows come back to the driver, which sums them in corpus order into one figure
   (`corpus.corpus_score`) and optionally writes them (parquet or JSON).

A document is the unit of work: its windows run on one actor, so a document's log-prob sum is computed
by exactly the code a local run uses, whatever the number of actors or the batch boundaries. An actor
that dies is restarted and its batch retried (Ray Data's actor pools default to max_restarts=-1 and
max_task_retries=-1); a retried batch's partial output is discarded by Ray, so no document is scored
twice or dropped. An actor whose constructor raises (a model that cannot load) fails the job at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .. import corpus
from ..errors import InputError, PyBitNetError
from ..loaders import load

# Documents per actor call: small enough to spread a few hundred documents over a handful of actors.
BATCH_DOCUMENTS = 16


class RayUnavailableError(PyBitNetError, ImportError):
    """Ray (with Ray Data) is not installed."""


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise RayUnavailableError(
            f"distributed scoring needs Ray Data: pip install \"pybitnet[ray]\" (import failed: {err})") from None
    return ray


def _document_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("file", pa.int64()), ("position", pa.int64()), ("text", pa.string()),
                      ("tokens", pa.list_(pa.int64())), ("error", pa.string())])


def _document_rows(documents) -> list[dict]:
    return [{"id": d.id, "file": d.index[0], "position": d.index[1], "text": d.text, "tokens": d.tokens,
             "error": d.error} for d in documents]


def read_files(files, text_field: str):
    """Ray Data map_batches function (stateless, so Ray runs it as tasks): rows of (path, file number) ->
    one row per document in those files."""
    import pyarrow as pa

    rows = []
    for path, number in zip(files["path"].to_pylist(), files["file"].to_pylist()):
        rows += _document_rows(corpus.file_documents(path, number, text_field=text_field))
    return pa.Table.from_pylist(rows, schema=_document_schema())


class DocumentScorer:
    """Ray Data actor: loads the model once, then scores batches of documents (one output row per input row)."""

    def __init__(self, model_spec, tokenizer_spec, dtype: torch.dtype, threads: int, ctx: int | None,
                 stride: int | None, per_token: bool, text_field: str):
        import warnings

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS from num_cpus; torch's own pool is set here
        self.model = load(model_spec, dtype=dtype) if isinstance(model_spec, str) else model_spec()
        self.tokenizer = corpus.open_tokenizer(tokenizer_spec) if tokenizer_spec else None
        self.ctx, self.stride = corpus.resolve_window(self.model, ctx, stride)
        self.per_token, self.text_field = per_token, text_field
        warning = corpus.context_warning(self.model, self.ctx)
        if warning:
            warnings.warn(warning, stacklevel=1)

    def _document(self, row: dict) -> corpus.Document:
        index = (row.get("file") or 0, row.get("position") or 0)
        doc_id = row.get("id")
        if "file" in row:  # rows made by read_files: already parsed
            return corpus.Document(doc_id, index, text=row["text"], tokens=row["tokens"], error=row["error"])
        if doc_id is None:
            return corpus.Document("<missing id>", index, error="a document without an \"id\"")
        return corpus.record_document(row, str(doc_id), index, self.text_field)

    def __call__(self, batch):
        import pyarrow as pa

        rows = []
        with torch.no_grad():
            for row in batch.to_pylist():
                document = self._document(row)
                score = corpus.score_document(self.model, self.tokenizer, document, ctx=self.ctx, stride=self.stride,
                                              per_token=self.per_token)
                out = corpus.score_rows([score], self.per_token)[0]
                out["file"], out["position"] = score.index
                rows.append(out)
        schema = corpus.score_schema(self.per_token)
        schema = schema.append(pa.field("file", pa.int64())).append(pa.field("position", pa.int64()))
        return pa.Table.from_pylist(rows, schema=schema)


def _documents_dataset(dataset, text_field: str, read_cpus: float):
    ray = require_ray()
    if isinstance(dataset, ray.data.Dataset):
        columns = dataset.columns() or []
        if "id" not in columns:
            raise InputError(f"a ray.data.Dataset of documents needs an \"id\" column (columns: {columns})")
        if text_field not in columns and "tokens" not in columns:
            raise InputError(f"a ray.data.Dataset of documents needs a {text_field!r} or \"tokens\" column "
                             f"(columns: {columns})")
        return dataset
    paths = [dataset] if isinstance(dataset, (str, Path)) else list(dataset)
    if not paths:
        raise InputError("no documents: give a ray.data.Dataset or at least one file")
    files = ray.data.from_items([{"path": str(p), "file": i} for i, p in enumerate(paths)])
    return files.map_batches(read_files, fn_kwargs={"text_field": text_field}, batch_size=1, batch_format="pyarrow",
                             num_cpus=read_cpus)


def score_corpus(model_spec: str | Callable[[], object], dataset, *, actors: int = 2, threads_per_actor: int = 1,
                 cpus_per_actor: float | None = None, ctx: int | None = None, stride: int | None = None,
                 per_token: bool = False, output: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 tokenizer: str | None = None, text_field: str = "text",
                 batch_documents: int = BATCH_DOCUMENTS) -> corpus.CorpusScore:
    """Score every document of `dataset` on a pool of `actors` Ray actors; the result equals `corpus.score_documents`.

    model_spec: a MODEL spec (what `pybitnet.load` takes), loaded once in each actor, or a zero-argument
        callable returning a model (pickled to the actors). tokenizer: where the tokenizer comes from
        (default: model_spec when it is a path); token-id documents need none.
    dataset: a `ray.data.Dataset` with "id" and "text"/"tokens" columns, or file paths (text, JSONL, parquet),
        which every Ray node must be able to read.
    ctx, stride: window length and step as in `corpus.score_documents` (default: the model's context, at most 2048).
    cpus_per_actor: CPUs Ray reserves per actor (default threads_per_actor).
    output: a `.parquet` or `.json` file of per-document rows (written atomically), or None.
    The result's rows are in corpus order: files in the order given, then position in the file; a
    Dataset's rows by id.
    Uses the running Ray instance (`ray.init(address=...)` first to join a cluster), else starts a local one.
    """
    ray = require_ray()
    if ctx is not None:
        corpus.check_window(ctx, stride)
    if actors < 1 or threads_per_actor < 1 or batch_documents < 1:
        raise InputError(f"actors, threads_per_actor and batch_documents must be >= 1, got {actors}, "
                         f"{threads_per_actor}, {batch_documents}")
    if output is not None:
        corpus.check_output(output)
    if tokenizer is None and isinstance(model_spec, str):
        tokenizer = model_spec
    cpus = float(threads_per_actor if cpus_per_actor is None else cpus_per_actor)
    if not ray.is_initialized():
        ray.init()
    documents = _documents_dataset(dataset, text_field, read_cpus=min(cpus, 1.0))
    scored = documents.map_batches(
        DocumentScorer,
        fn_constructor_kwargs={"model_spec": model_spec, "tokenizer_spec": tokenizer, "dtype": dtype,
                               "threads": threads_per_actor, "ctx": ctx, "stride": stride, "per_token": per_token,
                               "text_field": text_field},
        batch_size=batch_documents, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
    )
    scores = [_score_from_row(row) for row in scored.iter_rows()]
    result = corpus.corpus_score(scores)
    if output is not None:
        corpus.write_scores(result, output, per_token=per_token)
    return result


def _score_from_row(row: dict) -> corpus.DocumentScore:
    logprobs = row.get("logprobs")
    return corpus.DocumentScore(
        id=row["id"], index=(row["file"], row["position"]), tokens=row["tokens"], tokens_scored=row["tokens_scored"],
        logprob_sum=row["logprob_sum"], perplexity=row["perplexity"], windows=row["windows"], error=row["error"],
        logprobs=None if logprobs is None else list(logprobs))

