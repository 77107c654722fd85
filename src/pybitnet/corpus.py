"""Corpus scoring on one process: documents read from files, each scored on its own, one corpus figure.

A document is a text (tokenized with the model's tokenizer) or a list of token ids. Files hold:
- a text file (any suffix not below): one document, the whole file;
- JSONL (`.jsonl`, `.ndjson`): one document per line, its "text" (or "tokens") field, "id" if present;
- parquet (`.parquet`): one document per row, its "text" (or "tokens") column, "id" if present.

Each document is scored independently, with the windows of `evaluate.perplexity`: its first token is
context only, every other token is scored exactly once, in windows of at most `ctx` tokens. The corpus figure is
total NLL over total scored tokens. A bad document (invalid UTF-8 or Unicode, empty, unreadable line, ids
out of range, text the tokenizer rejects) gets an `error` and no figures; it never stops the job.

Sums use `math.fsum` (correctly rounded, so independent of summation order): the same documents give
bit-identical sums whether scored here or spread over many workers in any order.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import InputError, PyBitNetError
from .evaluate import perplexity_windows, token_logprobs
from .loaders import load_tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass
class Document:
    """One document to score: exactly one of `text` / `tokens`, or an `error` found while reading it."""

    id: str
    index: tuple[int, int]  # (file number, position in file): the order of the corpus
    text: str | None = None
    tokens: list[int] | None = None
    error: str | None = None


@dataclass
class DocumentScore:
    id: str
    index: tuple[int, int]
    tokens: int = 0  # tokens in the document (after tokenization)
    tokens_scored: int = 0  # tokens - 1: the first token is only context
    logprob_sum: float = 0.0  # sum of log p(token | preceding window), nats
    perplexity: float = float("nan")
    windows: int = 0
    error: str | None = None
    logprobs: list[float] | None = None  # per scored token, when asked for


@dataclass
class CorpusScore:
    perplexity: float
    nll: float  # total NLL / total scored tokens (nats per token)
    tokens_scored: int
    documents: int
    failed: int  # documents with an error, left out of the corpus figure
    windows: int
    scores: list[DocumentScore] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- reading

# token ids beyond this cannot be held as torch.long; ids below it are checked against the vocabulary
TOKEN_ID_LIMIT = 2**63


def _parse_tokens(value, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InputError(f"{where}: \"tokens\" must be a list of integer token ids")
    for position, t in enumerate(value):
        if not 0 <= t < TOKEN_ID_LIMIT:
            raise InputError(f"{where}: token id out of range: {t} at position {position} (ids are >= 0 and "
                             "below the vocabulary size)")
    return [int(t) for t in value]


def _check_unicode(text: str, where: str, what: str) -> str:
    """`text` itself, or InputError when it holds a lone surrogate (JSON's "\\ud800" decodes to one): such a
    string has no UTF-8 form, so no tokenizer or output file can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{where}: {what} is not valid Unicode (a lone surrogate, "
                         f"{text[err.start]!a}, at character {err.start})") from None
    return text


def record_document(record, where: str, index: tuple[int, int], text_field: str) -> Document:
    """A JSONL object or parquet row as a Document (errors become the document's error)."""
    if not isinstance(record, dict):
        return Document(where, index, error=f"{where}: expected a JSON object, got {type(record).__name__}")
    doc_id = str(record["id"]) if record.get("id") is not None else where
    try:
        _check_unicode(doc_id, where, "\"id\"")
    except InputError as err:  # an id that cannot be printed or written out: the row is named by its place
        return Document(where, index, error=str(err))
    try:
        if record.get(text_field) is not None:
            text = record[text_field]
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            if not isinstance(text, str):
                raise InputError(f"{where}: {text_field!r} must be a string, got {type(text).__name__}")
            return Document(doc_id, index, text=_check_unicode(text, where, repr(text_field)))
        if record.get("tokens") is not None:
            tokens = record["tokens"]
            tokens = tokens.tolist() if hasattr(tokens, "tolist") else tokens
            return Document(doc_id, index, tokens=_parse_tokens(list(tokens), where))
        raise InputError(f"{where}: no {text_field!r} or \"tokens\" field")
    except UnicodeDecodeError as err:
        return Document(doc_id, index, error=f"{where}: invalid UTF-8 at byte {err.start}")
    except InputError as err:
        return Document(doc_id, index, error=str(err))


def _jsonl_documents(data: bytes, source: str, file_number: int, text_field: str) -> Iterator[Document]:
    for line_number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{line_number}"
        index = (file_number, line_number)
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield Document(where, index, error=f"{where}: invalid UTF-8 at byte {err.start} of the line")
            continue
        except json.JSONDecodeError as err:
            yield Document(where, index, error=f"{where}: not valid JSON ({err.msg})")
            continue
        yield record_document(record, where, index, text_field)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError("parquet files need pyarrow: pip install pyarrow (or pybitnet[ray])") from None
    return pyarrow


def require_pyarrow() -> None:
    """InputError saying how to install pyarrow when it is missing (parquet input or output)."""
    _pyarrow()


def _parquet_documents(data: bytes, source: str, file_number: int, text_field: str) -> Iterator[Document]:
    pa = _pyarrow()
    pq = pa.parquet

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        yield Document(source, (file_number, 0), error=f"{source}: not a readable parquet file ({err})")
        return
    if text_field not in table.column_names and "tokens" not in table.column_names:
        yield Document(source, (file_number, 0),
                       error=f"{source}: no {text_field!r} or \"tokens\" column (columns: {table.column_names})")
        return
    # binary columns are read as bytes and decoded strictly, so invalid UTF-8 is reported, not replaced
    for row_number, record in enumerate(table.to_pylist()):
        yield record_document(record, f"{source}:{row_number}", (file_number, row_number), text_field)


def file_documents(path: str | Path, file_number: int = 0, *, text_field: str = "text") -> Iterator[Document]:
    """The documents of one file, in file order; a file that cannot be read is one document with an error."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        yield Document(source, (file_number, 0), error=f"{source}: cannot read ({err.strerror or err})")
        return
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(data, source, file_number, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from _parquet_documents(data, source, file_number, text_field)
    else:
        try:
            yield Document(source, (file_number, 0), text=data.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield Document(source, (file_number, 0), error=f"{source}: invalid UTF-8 at byte {err.start}")


def read_documents(paths: Iterable[str | Path], *, text_field: str = "text") -> Iterator[Document]:
    """The documents of every file in order (files numbered in the order given)."""
    for file_number, path in enumerate(paths):
        yield from file_documents(path, file_number, text_field=text_field)


def read_token_file(path: str | Path) -> list[int]:
    """Token ids of a token file: whitespace/comma separated integers, or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        content = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: invalid UTF-8 at byte {err.start}") from None
    try:
        ids = json.loads(content) if content.startswith("[") else [int(x) for x in content.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"{path}: token ids must be integers (whitespace/comma separated or a JSON list)") from None
    if not ids:
        raise InputError(f"{path}: no token ids")
    return _parse_tokens(ids, str(path))


# ---------------------------------------------------------------------------------------------- model

# A MODEL spec becomes a model through `pybitnet.load` and a tokenizer through `open_tokenizer` below.

class MissingTokenizer:
    """Stands in for a model without a tokenizer: token-id documents still score, text ones get this error."""

    def __init__(self, reason: str):
        self.reason = reason

    def encode(self, text: str) -> list[int]:
        raise InputError(f"cannot tokenize text: {self.reason}; give token ids instead")


def open_tokenizer(spec: str):
    """The model's tokenizer, or a MissingTokenizer saying why there is none (raised only by text documents)."""
    try:
        return load_tokenizer(spec)
    except PyBitNetError as err:
        return MissingTokenizer(f"model {spec} has no tokenizer ({err})")


# ---------------------------------------------------------------------------------------------- scoring

def document_logprobs(model, tokens: list[int] | torch.Tensor, *, ctx: int, stride: int) -> tuple[torch.Tensor, int]:
    """(log p of tokens[1:] (T-1,) float64, windows used): the windows of `evaluate.perplexity`
    (`perplexity_windows`), keeping every token's log-prob instead of only their sum."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    parts = []
    spans = perplexity_windows(tokens.numel(), ctx, stride)
    for begin, first_target, end in spans:
        logp = token_logprobs(model, tokens[begin:end])  # predicts tokens[begin + 1 : end]
        parts.append(logp[first_target - (begin + 1):])
    return torch.cat(parts), len(spans)


def context_warning(model, ctx: int) -> str | None:
    """A warning when windows are longer than the positions the model was trained on."""
    limit = model.config.max_position_embeddings
    if limit and ctx > limit:
        return f"--ctx {ctx} exceeds the model's context of {limit} tokens; positions past it are extrapolated"
    return None


def tokenize(document: Document, tokenizer) -> list[int]:
    """A document's token ids (text through the tokenizer, BOS as the tokenizer adds it)."""
    if document.tokens is not None:
        return document.tokens
    if document.text is None or not document.text.strip():
        raise InputError(f"{document.id}: empty document")
    if tokenizer is None:
        tokenizer = MissingTokenizer("no tokenizer given")
    _check_unicode(document.text, document.id, "the text")
    try:
        return tokenizer.encode(document.text)
    except InputError as err:
        raise InputError(f"{document.id}: {err}") from None
    except Exception as err:  # the tokenizer library's own failure on this text concerns this document only
        raise InputError(f"{document.id}: the tokenizer cannot encode this text "
                         f"({type(err).__name__}: {err})") from None


def score_document(model, tokenizer, document: Document, *, ctx: int, stride: int,
                   per_token: bool = False) -> DocumentScore:
    """Score one document; any problem with the document is returned as its `error`, never raised."""
    result = DocumentScore(document.id, document.index, error=document.error)
    if document.error is not None:
        return result
    try:
        tokens = tokenize(document, tokenizer)
        result.tokens = len(tokens)
        if len(tokens) < 2:
            raise InputError(f"{document.id}: {'empty document' if not tokens else 'only one token'}, nothing to score")
        logp, result.windows = document_logprobs(model, tokens, ctx=ctx, stride=stride)
    except PyBitNetError as err:
        message = str(err)
        result.error = message if message.startswith(f"{document.id}:") else f"{document.id}: {message}"
        return result
    values = logp.tolist()
    result.tokens_scored = len(values)
    result.logprob_sum = math.fsum(values)
    result.perplexity = math.exp(-result.logprob_sum / len(values))
    if per_token:
        result.logprobs = values
    return result


def corpus_score(scores: Iterable[DocumentScore]) -> CorpusScore:
    """The corpus figure from per-document scores, in corpus order; failed documents are counted apart."""
    scores = sorted(scores, key=lambda s: (tuple(s.index), s.id))
    good = [s for s in scores if s.error is None]
    tokens = sum(s.tokens_scored for s in good)
    nll = -math.fsum(s.logprob_sum for s in good) / tokens if tokens else float("nan")
    return CorpusScore(perplexity=math.exp(nll) if tokens else float("nan"), nll=nll, tokens_scored=tokens,
                       documents=len(scores), failed=len(scores) - len(good),
                       windows=sum(s.windows for s in good), scores=scores)


DEFAULT_CTX = 2048


def resolve_window(model, ctx: int | None, stride: int | None) -> tuple[int, int]:
    """(ctx, stride) to use: ctx defaults to the model's context (at most DEFAULT_CTX), stride to ctx
    (windows then overlap by the one token of context each target needs)."""
    if ctx is None:
        ctx = min(DEFAULT_CTX, model.config.max_position_embeddings or DEFAULT_CTX)
    return ctx, check_window(ctx, stride)


def check_window(ctx: int, stride: int | None) -> int:
    """The stride to use (default ctx); InputError unless ctx >= 2 and 1 <= stride <= ctx."""
    stride = ctx if stride is None else stride
    if ctx < 2 or stride < 1 or stride > ctx:
        raise InputError(f"perplexity needs ctx >= 2 and 1 <= stride <= ctx, got ctx={ctx}, stride={stride}")
    return stride


def score_documents(model, tokenizer, documents: Iterable[Document], *, ctx: int | None = None,
                    stride: int | None = None, per_token: bool = False,
                    progress: Callable[[DocumentScore], None] | None = None) -> CorpusScore:
    """Score every document on this process, one after another, and the corpus figure (see resolve_window)."""
    ctx, stride = resolve_window(model, ctx, stride)
    scores = []
    with torch.no_grad():
        for document in documents:
            scores.append(score_document(model, tokenizer, document, ctx=ctx, stride=stride, per_token=per_token))
            if progress:
                progress(scores[-1])
    return corpus_score(scores)


# ---------------------------------------------------------------------------------------------- output

def score_rows(scores: Iterable[DocumentScore], per_token: bool) -> list[dict]:
    rows = []
    for s in scores:
        row = asdict(s)
        del row["index"]
        if not per_token:
            del row["logprobs"]
        rows.append(row)
    return rows


def _atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def corpus_summary(result: CorpusScore) -> dict:
    return {k: v for k, v in asdict(result).items() if k != "scores"}


def write_json(result: CorpusScore, path: str | Path, *, per_token: bool = False) -> None:
    """{"corpus": {...}, "documents": [...]} (NaN perplexities of failed documents as null)."""
    def clean(row: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}

    payload = {"corpus": clean(corpus_summary(result)),
               "documents": [clean(r) for r in score_rows(result.scores, per_token)]}

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)

    _atomic_write(path, write)


def score_schema(per_token: bool):
    pa = _pyarrow()

    fields = [("id", pa.string()), ("tokens", pa.int64()), ("tokens_scored", pa.int64()),
              ("logprob_sum", pa.float64()), ("perplexity", pa.float64()), ("windows", pa.int64()),
              ("error", pa.string())]
    if per_token:
        fields.append(("logprobs", pa.list_(pa.float64())))
    return pa.schema(fields)


def write_parquet(scores: Iterable[DocumentScore], path: str | Path, *, per_token: bool = False) -> None:
    """One row per document, in corpus order."""
    pa = _pyarrow()
    table = pa.Table.from_pylist(score_rows(scores, per_token), schema=score_schema(per_token))
    _atomic_write(path, lambda tmp: pa.parquet.write_table(table, tmp))


OUTPUT_SUFFIXES = (".json", ".parquet")


def check_output(path: str | Path) -> None:
    if Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"output file must end in .json or .parquet, got {path}")


def check_writable(path: str | Path) -> None:
    """InputError unless an output file can be written at `path`: checked before any scoring, by creating
    (and removing) a temporary file where `_atomic_write` will create its own."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an output file")
    if not parent.is_dir():
        raise InputError(f"{path}: the directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise InputError(f"{path}: cannot write in {parent} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(tmp)


def write_scores(result: CorpusScore, path: str | Path, *, per_token: bool = False) -> None:
    """Per-document rows as .json (with the corpus figure) or .parquet, by the file's suffix."""
    check_output(path)
    if Path(path).suffix.lower() == ".json":
        write_json(result, path, per_token=per_token)
    else:
        write_parquet(result.scores, path, per_token=per_token)
