"""Constrained decoding: output that follows a JSON schema, a regular expression or a grammar.

The grammars are compiled and run by llguidance (the constraint library of llama.cpp and vLLM; why this one:
docs/constraints.md). A `Constraint` is a grammar compiled for one tokenizer; `Constraint.start()` gives a
`ConstraintState` for one output row, which knows which tokens may come next (a bit mask over the
vocabulary) and takes each sampled token. Decoding with a constraint:

    state = constraint.start()
    scores = state.mask(logits)          # (1, V): disallowed ids set to -inf, the logits left as they were
    token = sample(scores, ...)
    state.advance(token)                 # the grammar takes the token
    state.done                           # the grammar can take nothing more: stop

Masks are computed where they are first needed, or earlier by `prefetch_masks(states)`, which computes them
in a background thread (llguidance releases the GIL) while the model runs its next step.

Only the choice of tokens changes: logprobs a caller reports come from the unmasked logits (the model's own
distribution), and a row's mask depends on that row's tokens alone, so batching stays invariant.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .tokenizer import Tokenizer

# The largest schema, regex or grammar text accepted (the JSON of a schema, canonical form).
MAX_SOURCE_BYTES = 64 << 10
# Compiled constraints kept for reuse (keyed by the canonical text): a schema sent again compiles once.
CACHE_SIZE = 128
# JSON output without free whitespace: a model that may pad with whitespace sometimes does so without end.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_schema", "regex", "grammar")


class ConstraintError(InputError):
    """A schema, regex or grammar that cannot be compiled; the message says why."""


def _llguidance():
    try:
        import llguidance
        import llguidance.gbnf_to_lark  # noqa: F401 - GBNF grammars (llama.cpp's)
        # not llguidance.torch: it compiles a kernel with torch.compile at import (about 190 MiB of memory)
    except ImportError as err:  # a core dependency; missing only in a broken install
        raise InputError("constrained output needs the llguidance package (pip install llguidance)") from err
    return llguidance


_tokenizers: dict[tuple, tuple[object, object]] = {}  # (backend id, vocab) -> (backend, LLTokenizer)
_tokenizers_lock = threading.Lock()


def prepare(tokenizer: Tokenizer, vocab_size: int | None = None, stop_token_ids: Iterable[int] = ()) -> None:
    """Build llguidance's view of a tokenizer now (about 3 s for a 128k vocabulary, once per process) rather
    than on the first constrained request. Its stop tokens (where a complete grammar may end) are the
    tokenizer's plus `stop_token_ids` (a chat format's end-of-turn token, say)."""
    _ll_tokenizer(tokenizer, int(vocab_size if vocab_size is not None else tokenizer.vocab_size), stop_token_ids)


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Iterable[int] = ()):
    """llguidance's view of a tokenizer, built once per tokenizer and vocabulary size; the first build
    fixes its stop tokens (the tokenizer's plus `stop_token_ids`)."""
    key = (id(tokenizer.backend), vocab_size)
    with _tokenizers_lock:
        hit = _tokenizers.get(key)
        if hit is not None and hit[0] is tokenizer.backend:
            return hit[1]
        llg = _llguidance()
        if vocab_size < tokenizer.vocab_size:
            raise InputError(f"the model's vocabulary ({vocab_size}) is smaller than its tokenizer's "
                             f"({tokenizer.vocab_size})")
        stops = list(dict.fromkeys([*tokenizer.stop_token_ids, *(int(t) for t in stop_token_ids)]))
        if not stops and tokenizer.eos_token_id is not None:
            stops = [tokenizer.eos_token_id]
        ll = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=stops)
        _tokenizers[key] = (tokenizer.backend, ll)
        return ll


@dataclass(frozen=True, eq=False)
class Constraint:
    """A grammar compiled for one tokenizer: start() gives each output row its own state."""

    kind: str  # json_schema | regex | grammar
    source: str  # the schema's canonical JSON, the regex or the grammar text
    vocab_size: int
    stop_ids: tuple[int, ...]  # tokens that end the output once the grammar is complete
    _matcher: object  # an llguidance LLMatcher at the start of the grammar, never advanced itself

    @classmethod
    def json_schema(cls, schema: dict | str | bool, tokenizer: Tokenizer, **options) -> "Constraint":
        return compile_constraint("json_schema", schema, tokenizer, **options)

    @classmethod
    def json_object(cls, tokenizer: Tokenizer, **options) -> "Constraint":
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return compile_constraint("json_schema", {"type": "object"}, tokenizer, **options)

    @classmethod
    def regex(cls, pattern: str, tokenizer: Tokenizer, **options) -> "Constraint":
        return compile_constraint("regex", pattern, tokenizer, **options)

    @classmethod
    def grammar(cls, text: str, tokenizer: Tokenizer, **options) -> "Constraint":
        """A Lark grammar as llguidance takes it (start rule `start`), or a GBNF grammar (llama.cpp's, start
        rule `root`), which is translated to Lark first."""
        return compile_constraint("grammar", text, tokenizer, **options)

    def start(self) -> "ConstraintState":
        with _start_lock:  # the template matcher is shared by every thread that starts a row
            return ConstraintState(self, self._matcher.deep_copy())


def canonical_source(kind: str, source) -> str:
    """The text a constraint is compiled from and cached by; raises ConstraintError for a wrong type or size."""
    if kind not in KINDS:
        raise ConstraintError(f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")
    if kind == "json_schema":
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except ValueError as err:
                raise ConstraintError(f"the JSON schema is not valid JSON: {err}") from None
        if not isinstance(source, (dict, bool)):
            raise ConstraintError(f"a JSON schema must be an object, got {type(source).__name__}")
        text = json.dumps(source, sort_keys=False, separators=(",", ":"), ensure_ascii=False)
    else:
        if not isinstance(source, str) or not source:
            raise ConstraintError(f"a {kind} must be a non-empty string")
        text = source
    if len(text.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise ConstraintError(f"the {kind.replace('_', ' ')} is {len(text.encode('utf-8'))} bytes; at most "
                              f"{MAX_SOURCE_BYTES} are accepted")
    return text


_start_lock = threading.Lock()
_cache: collections.OrderedDict[tuple, Constraint] = collections.OrderedDict()
_cache_lock = threading.Lock()


def compile_constraint(kind: str, source, tokenizer: Tokenizer, *, vocab_size: int | None = None,
                       stop_token_ids: Iterable[int] | None = None) -> Constraint:
    """Compile (or take from the cache) a constraint; raises ConstraintError naming what is wrong.

    vocab_size: the model's (its logits' width), default the tokenizer's. The tokens that end the output once
    the grammar is complete are the tokenizer's stop tokens plus `stop_token_ids`, as the first constraint
    (or prepare()) for this tokenizer and vocabulary size fixed them.
    """
    if tokenizer is None:
        raise InputError("constrained output needs a tokenizer")
    text = canonical_source(kind, source)
    vocab = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
    ll_tokenizer = _ll_tokenizer(tokenizer, vocab, stop_token_ids or ())
    stops = tuple(int(t) for t in ll_tokenizer.eos_tokens)
    key = (kind, text, id(ll_tokenizer))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    constraint = Constraint(kind, text, vocab, stops, _compile(kind, text, ll_tokenizer))
    with _cache_lock:
        _cache[key] = constraint
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return constraint


def _compile(kind: str, text: str, ll_tokenizer):
    llg = _llguidance()
    try:
        if kind == "json_schema":
            grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(text)
        else:
            grammar = text
            if "::=" in text and not llg.gbnf_to_lark.is_lark_syntax(text):  # GBNF (llama.cpp's grammars)
                grammar = llg.gbnf_to_lark.gbnf_to_lark(text)
            grammar = llg.LLMatcher.grammar_from_lark(grammar)
    except Exception as err:  # ValueError, GbnfToLarkError, ...: the text is not what it claims to be
        raise ConstraintError(f"the {kind.replace('_', ' ')} cannot be compiled: {err}") from None
    matcher = llg.LLMatcher(ll_tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"the {kind.replace('_', ' ')} cannot be compiled: {_first_lines(matcher.get_error())}")
    return matcher


def _first_lines(message: str, lines: int = 4) -> str:
    return " ".join(line.strip() for line in message.strip().splitlines()[:lines])


class ConstraintState:
    """One row's progress through a constraint: the mask of allowed next tokens, and the tokens taken."""

    def __init__(self, constraint: Constraint, matcher):
        self.constraint = constraint
        self._matcher = matcher
        self._bits = torch.zeros((constraint.vocab_size + 31) // 32, dtype=torch.int32)
        self._allowed: np.ndarray | None = None  # (V,) bool, for the current position
        self._lock = threading.Lock()  # held while a mask is computed (possibly in the prefetch thread)

    def compute_mask(self) -> np.ndarray:
        """The (V,) bool mask of tokens allowed next (computed once per position)."""
        with self._lock:
            if self._allowed is None:
                self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
                bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")
                self._allowed = bits[: self.constraint.vocab_size].astype(np.bool_)
            return self._allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) or (V,) of this row with every disallowed id at -inf (a new tensor).

        On the CPU this runs in numpy, on one thread: torch would split a 128k-element fill over its
        intra-op threads, which costs milliseconds a token on a machine whose cores are busy."""
        allowed = self.compute_mask()
        if not allowed.any():  # the grammar is in error: only a stop token may come (it ends the row)
            allowed = np.zeros_like(allowed)
            allowed[list(self.constraint.stop_ids)] = True
        width = logits.shape[-1]
        if width != allowed.shape[0]:
            allowed = allowed[:width] if width < allowed.shape[0] else np.pad(allowed, (0, width - allowed.shape[0]))
        if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
            values = logits.detach().numpy()
            return torch.from_numpy(np.where(allowed, values, np.array(-np.inf, dtype=values.dtype)))
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def allows_any(self) -> bool:
        return bool(self.compute_mask().any())

    def advance(self, token: int) -> bool:
        """Take a sampled token; False if the grammar refuses it (the state is then in error and done)."""
        with self._lock:
            self._allowed = None
            return bool(self._matcher.consume_token(int(token)))

    # Every use of the matcher holds the lock: a prefetch queued earlier may still be computing on it, and the
    # matcher takes one caller at a time.

    @property
    def done(self) -> bool:
        """The grammar takes no more tokens (complete, or in error)."""
        with self._lock:
            return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """What was taken so far is a complete match (it may still go on)."""
        with self._lock:
            return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str:
        with self._lock:
            return self._matcher.get_error() if self._matcher.is_error() else ""


# Compute masks ahead in a background thread (prefetch_masks); False: each mask is computed when sampling
# needs it, on the decoding thread (benchmarks/constrained_decode.py measures both).
PREFETCH = True
_prefetcher: ThreadPoolExecutor | None = None
_prefetcher_lock = threading.Lock()


def prefetch_masks(states: Sequence[ConstraintState]) -> None:
    """Compute these states' next masks in a background thread; mask() waits for one still being computed."""
    global _prefetcher
    if not PREFETCH:
        return
    pending = [s for s in states if s is not None and s._allowed is None and not s.done]
    if not pending:
        return
    with _prefetcher_lock:
        if _prefetcher is None:
            _prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pybitnet-masks")
    _prefetcher.submit(_compute_all, pending)


def _compute_all(states: Sequence[ConstraintState]) -> None:
    for state in states:
        try:
            state.compute_mask()
        except Exception:  # noqa: BLE001 - the decoding thread computes it again and sees the error itself
            pass


def as_constraints(constraint, rows: int) -> list[Constraint | None]:
    """One constraint (or None) per row from one for all rows or a list of one per row."""
    if constraint is None or isinstance(constraint, Constraint):
        return [constraint] * rows
    items = list(constraint)
    if len(items) != rows:
        raise InputError(f"got {len(items)} constraints for {rows} prompts (give one for all, or one per prompt)")
    for item in items:
        if item is not None and not isinstance(item, Constraint):
            raise InputError(f"a constraint must be a pybitnet.constraints.Constraint, got {type(item).__name__}")
    return items
