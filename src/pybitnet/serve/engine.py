"""Continuous batching: one scheduler thread owns the model and a KV cache of `max_batch` rows.

Each iteration of the scheduler
  1. drops cancelled requests (their rows are free for the next iteration),
  2. admits the oldest waiting request when enough rows are free for its `n` choices,
  3. runs one prefill chunk of the request being admitted (`prefill_chunk` tokens, up to a quarter more
     to finish the prompt), alone (batch 1) in a cache of its own;
     after its last chunk the prompt's K/V are copied into rows of the shared cache (KVCache.copy_rows)
     and its first tokens are sampled,
  4. runs one decode step over the busy rows and samples each one's next token.
A long prompt is thus prefilled in chunks between decode steps, and running requests keep getting tokens.
With a prefix cache (serve/prefix_cache.py), admission first copies the K/V of the longest cached prefix of
the prompt into its small cache and prefills only the rest; every chunk's full blocks, and each finished
choice's prompt + output, are handed to the cache for later requests. Prefill runs one request at a time,
so a request that shares a prefix with the one being prefilled waits and then finds its blocks cached:
no prefix is computed twice.
Busy rows stay packed at the front of the cache (a finished row's place is taken by the last busy row), so
a decode step runs over a view of the busy rows only and idle capacity costs nothing.

Batch invariance: a request's logits must not depend on who else is being served. A float32 CPU model with
the native library decodes every row on its own (Transformer.decode_is_row_independent: per-row
quantization, exact integer GEMVs, attention over each row's own positions, a row-independent head), so
a step runs over the busy rows only. Without the native library, three things in a decode step can make
logits depend on the batch, all measured on this engine (torch 2.13, MKL, 2 threads):
  - the lm_head GEMM rounds differently for 1, 2 or 3 rows than for 4 or more (BLAS picks another kernel);
  - attention sums a row's scores over every key position up to the batch's longest row (masked ones
    included), and a longer key range changes the order of that float sum;
  - CPU flash attention gives each thread a scratch buffer at a different alignment, and MKL's GEMM takes
    alignment-dependent code paths, so a row's result depends on which thread its row lands on. MKL's
    conditional numerical reproducibility (environment MKL_CBWR=AUTO, read at MKL's first call) removes
    this; `pybitnet serve` sets it, and `attention_is_row_independent()` checks it at start.
So on that path a decode step always has at least MIN_DECODE_ROWS rows (idle rows decode a dummy token at
position 0 and their output is dropped), and row 0 is a sentinel held at the cache's last position, which
fixes every step's key range at the whole cache. Prefill always runs one request alone, so it is
batch-independent as it stands. `batch_invariant=False` drops the sentinel and the padding: attention then
spans only the longest busy row (cheaper when prompts are short next to the cache), and on the torch path
logits may differ from a solo run in the last bits.

The scheduler never blocks on clients: it reports through each request's `on_event` callback, which the
HTTP layer turns into a thread-safe hand-off to its event loop.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..constraints import prefetch_masks
from ..errors import InputError, PyBitNetError
from ..generate import CONTEXT, LENGTH, _advance, _Row
from ..sampling import SamplingParams, make_generator, mark_seen, sample
from ..tokenizer import IncrementalDecoder, Tokenizer
from .metrics import ServerMetrics

log = logging.getLogger("pybitnet.serve")

# Prompt tokens prefilled per scheduler iteration: long prompts yield to decode steps between chunks.
DEFAULT_PREFILL_CHUNK = 512
# BLAS rounds the lm_head GEMM of 1-3 rows differently from 4 or more; 4 and more all agree.
MIN_DECODE_ROWS = 4


class QueueFull(PyBitNetError):
    """The waiting queue is at its limit; the client should retry later."""


class Draining(PyBitNetError):
    """The server is shutting down and admits no new requests."""


@dataclass
class GenerationSpec:
    """What to generate for one prompt: everything the scheduler needs, already validated."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    n: int = 1
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's plus k alternatives
    prompt_logprobs: bool = False  # logprobs of the prompt's own tokens (completions with echo)
    constraint: object | None = None  # a pybitnet.constraints.Constraint every choice's output follows


@dataclass
class TokenEvent:
    """One sampled token of one choice (or its end)."""

    choice: int
    token: int | None  # None when nothing was added (a stop token ends the choice without output)
    text: str  # text that is now safe to show ('' while a character or a possible stop string is held back)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # OpenAI's: "stop" | "length"


@dataclass
class PromptLogprobsEvent:
    logprobs: list[float | None]  # one per prompt token; the first has none
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class DoneEvent:
    prompt_tokens: int
    completion_tokens: list[int]  # per choice
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


@dataclass
class ErrorEvent:
    message: str


class GenerationRequest:
    """A submitted spec and its progress; owned by the scheduler thread once submitted."""

    _next_id = 0

    def __init__(self, spec: GenerationSpec, on_event: Callable[[object], None]):
        self.spec = spec
        self.on_event = on_event
        self.cancelled = False  # set from the HTTP side; the scheduler acts on it before its next step
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.choices: list[_Choice] = []
        self.small_cache = None  # the batch-1 cache the prompt is prefilled into
        self.prefilled = 0  # prompt tokens prefilled so far (cached ones included)
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache
        self.reserved = 0  # rows this request will take when its prefill ends
        self.prompt_lp: list[float | None] = []  # prompt_logprobs: one per prompt token so far
        self.prompt_top: list[list[tuple[int, float]] | None] = []

    @property
    def finished(self) -> bool:
        return bool(self.choices) and all(c.row.finish is not None for c in self.choices)


@dataclass
class _Choice:
    index: int
    row: _Row
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (1, V) bool: prompt + output tokens, for the repetition penalty
    counts: torch.Tensor | None  # (1, V) float: output token counts, for presence/frequency penalties
    place: int = -1  # its row in the shared cache
    next_token: int = 0
    fed: list[int] = field(default_factory=list)  # sampled tokens fed back, whose K/V follow the prompt's
    last_token_time: float = 0.0
    state: object | None = None  # its ConstraintState, when the request has a constraint


_FINISH = {LENGTH: "length", CONTEXT: "length"}  # stop_token / stop_string -> "stop"


class Engine:
    def __init__(self, model, tokenizer: Tokenizer | None, *, max_batch: int = 16, max_queue: int = 64,
                 context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 batch_invariant: bool = True, metrics: ServerMetrics | None = None, prefix_cache=None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise InputError(f"max_batch and prefill_chunk must be >= 1 and max_queue >= 0, "
                             f"got {max_batch}, {prefill_chunk}, {max_queue}")
        limit = int(model.config.max_position_embeddings)
        self.context = min(context, limit) if context else limit
        if self.context < 2:
            raise InputError(f"context must be at least 2 positions, got {self.context}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.batch_invariant = batch_invariant
        self.metrics = metrics or ServerMetrics()
        self.prefix_cache = prefix_cache  # a PrefixCache, or None: every prompt prefilled in full
        # pinned: the torch path's invariance (a sentinel row pins the key range, steps padded to
        # MIN_DECODE_ROWS rows); the native decode path needs neither.
        self.pinned = batch_invariant and not model.decode_is_row_independent()
        self.row_independent = not self.pinned or attention_is_row_independent()
        if batch_invariant and not self.row_independent:
            log.warning("attention output depends on a row's place in the batch on this BLAS: outputs may differ "
                        "in the last bits with the rest of the batch (start the process with MKL_CBWR=AUTO)")
        self.metrics.batch_invariant.set(1 if batch_invariant and self.row_independent else 0)
        self.vocab_size = int(model.config.vocab_size)
        self.first_row = 1 if self.pinned else 0  # row 0 is the sentinel that pins the key range
        self.cache = model.new_cache(self.first_row + max_batch, self.context)  # every row's K/V, in place
        self._views: dict[int, object] = {}  # rows -> a cache over the first `rows` rows of self.cache
        self._active: list[tuple[GenerationRequest, _Choice]] = []  # in cache-row order from first_row
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._prefilling: GenerationRequest | None = None
        self._wake = threading.Condition()
        self._draining = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pybitnet-scheduler", daemon=True)

    # -- called from other threads -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, spec: GenerationSpec, on_event: Callable[[object], None]) -> GenerationRequest:
        """Queue a request; raises QueueFull or Draining instead of waiting."""
        if spec.n > self.max_batch:
            raise InputError(f"n={spec.n} choices need more rows than the server has (max batch {self.max_batch})")
        if len(spec.prompt) + 1 > self.context:
            raise InputError(f"the prompt is {len(spec.prompt)} tokens but the context is {self.context} tokens")
        request = GenerationRequest(spec, on_event)
        with self._wake:
            if self._draining or self._stopped:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(request)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()
        return request

    def cancel(self, request: GenerationRequest) -> None:
        """Stop a request (its client went away); its rows are free before the next decode step."""
        if not request.cancelled and not request.finished:
            request.cancelled = True
            with self._wake:
                self._wake.notify()

    def drain(self) -> None:
        """Stop admitting new requests; those already accepted run to the end."""
        with self._wake:
            self._draining = True

    def idle(self) -> bool:
        with self._wake:
            return not (self._waiting or self._prefilling or self._active)

    def stop(self, timeout: float | None = None) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def running(self) -> bool:
        """Whether the scheduler thread is alive (after stop() returns it may still be, if the join timed out)."""
        return self._thread.is_alive()

    @property
    def busy_rows(self) -> int:
        return len(self._active)

    # -- the scheduler thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._waiting or self._prefilling or self._active or self._stopped):
                    self._wake.wait()
                if self._stopped:
                    self._fail_all("the server stopped")
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self._prefilling is not None:
                    self._prefill_chunk(self._prefilling)
                if self._active:
                    self._decode_step()
            except Exception as err:  # a bug must not take the scheduler down with every later request
                log.exception("scheduler step failed")
                self._fail_all(f"internal error: {type(err).__name__}: {err}")

    def _drop_cancelled(self) -> None:
        with self._wake:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                self.metrics.finished.labels("cancelled").inc()
            self.metrics.waiting.set(len(self._waiting))
        if self._prefilling is not None and self._prefilling.cancelled:
            self._release(self._prefilling)
            self._prefilling = None
        for request in {id(r): r for r, _ in self._active if r.cancelled}.values():
            self._release(request)

    def _release(self, request: GenerationRequest, reason: str = "cancelled") -> None:
        for choice in [c for r, c in self._active if r is request]:
            self._free_row(choice)
        request.reserved = 0
        request.small_cache = None
        self.metrics.finished.labels(reason).inc()

    def _free_row(self, choice: _Choice) -> None:
        """Take a choice out of the batch; the last busy row moves into its place, keeping rows packed."""
        index = choice.place - self.first_row
        last = len(self._active) - 1
        if index != last:
            moved = self._active[last]
            self.cache.copy_rows(self.cache, [moved[1].place], [choice.place])
            moved[1].place = choice.place
            self._active[index] = moved
        self._active.pop()
        choice.place = -1
        self.metrics.running.set(len(self._active))

    def _free_rows(self) -> int:
        reserved = self._prefilling.reserved if self._prefilling is not None else 0
        return self.max_batch - len(self._active) - reserved

    def _admit(self) -> None:
        if self._prefilling is not None:
            return
        with self._wake:
            if not self._waiting or self._free_rows() < self._waiting[0].spec.n:
                return
            request = self._waiting.popleft()
            self.metrics.waiting.set(len(self._waiting))
        request.reserved = request.spec.n
        request.small_cache = self.model.new_cache(1, len(request.spec.prompt))
        # Reuse cached K/V, but leave at least the last prompt token to run: its logits give the first token.
        # Prompt logprobs need the logits of every prompt position, so such a request computes them all.
        if self.prefix_cache is not None and not request.spec.prompt_logprobs:
            found = self.prefix_cache.match(request.spec.prompt, limit=len(request.spec.prompt) - 1)
            request.cached_tokens = request.prefilled = self.prefix_cache.load(found, request.small_cache, 0)
        self._prefilling = request

    def _prefill_chunk(self, request: GenerationRequest) -> None:
        spec, start = request.spec, request.prefilled
        end = chunk_end(start, len(spec.prompt), self.prefill_chunk)
        tokens = torch.tensor([spec.prompt[start:end]], dtype=torch.long, device=self.model.device)  # (1, C)
        if spec.prompt_logprobs:
            logits = self.model.prefill(tokens, request.small_cache, logits="all")[0]  # (C, V)
            self._prompt_logprobs(request, start, logits)
            last = logits[-1:]
        else:
            last = self.model.prefill(tokens, request.small_cache)  # (1, V)
        request.prefilled = end
        self._keep_prefix(spec.prompt, request.small_cache, 0, end)
        if end < len(spec.prompt):
            return
        self._prefilling = None
        self.metrics.prompt_tokens.inc(len(spec.prompt))
        self.metrics.prompt_tokens_cached.inc(request.cached_tokens)
        self.metrics.prompt_tokens_computed.inc(len(spec.prompt) - request.cached_tokens)
        self._join(request, last)

    def _keep_prefix(self, tokens: list[int], cache, row: int, upto: int) -> None:
        """Hand the full blocks of tokens[:upto], held at positions [0, upto) of a cache row, to the prefix cache."""
        if self.prefix_cache is None:
            return
        evictions = self.prefix_cache.evictions
        self.prefix_cache.store(tokens, cache, row, upto)
        self.metrics.prefix_cache_evictions.inc(self.prefix_cache.evictions - evictions)
        self.metrics.prefix_cache_bytes.set(self.prefix_cache.bytes_used)

    def _prompt_logprobs(self, request: GenerationRequest, start: int, logits: torch.Tensor) -> None:
        spec = request.spec
        if start == 0:
            request.prompt_lp, request.prompt_top = [None], [None]
        logprobs = torch.log_softmax(logits.double(), dim=-1)  # (C, V)
        for i in range(logprobs.shape[0]):
            position = start + i + 1  # logits at a position predict the next prompt token
            if position >= len(spec.prompt):
                break
            request.prompt_lp.append(float(logprobs[i, spec.prompt[position]]))
            request.prompt_top.append(_top(logprobs[i], spec.top_logprobs or 0))
        if start + logits.shape[0] >= len(spec.prompt):
            request.on_event(PromptLogprobsEvent(request.prompt_lp, request.prompt_top))

    def _join(self, request: GenerationRequest, logits: torch.Tensor) -> None:
        """Move the prefilled prompt into rows after the busy ones and sample every choice's first token."""
        spec = request.spec
        room = self.context - len(spec.prompt)  # positions left; the last sampled token is never fed back
        budget, reason = (spec.max_tokens, LENGTH) if spec.max_tokens <= room else (room, CONTEXT)
        for index in range(spec.n):
            place = self.first_row + len(self._active) + index
            self.cache.copy_rows(request.small_cache, [0], [place])
            decoder = IncrementalDecoder(self.tokenizer, spec.prompt) if self.tokenizer is not None else None
            seed = None if spec.seed is None else spec.seed + index  # choices differ, yet each repeats
            generator = None if spec.sampling.greedy else make_generator(seed, self.model.device)
            seen = counts = None
            if spec.sampling.repetition_penalty != 1.0:
                seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.model.device)
                mark_seen(seen, torch.tensor([spec.prompt], device=self.model.device))
            if spec.presence_penalty or spec.frequency_penalty:
                counts = torch.zeros(1, self.vocab_size, dtype=logits.dtype, device=self.model.device)
            row = _Row(prompt=spec.prompt, budget=budget, budget_reason=reason, decoder=decoder)
            state = spec.constraint.start() if spec.constraint is not None else None
            request.choices.append(_Choice(index, row, generator, seen, counts, place, state=state))
        request.small_cache = None
        request.reserved = 0
        now = time.perf_counter()
        request.first_token_time = now
        self.metrics.time_to_first_token.observe(now - request.arrival)
        for choice in request.choices:
            choice.last_token_time = now
            self._active.append((request, choice))
        self.metrics.running.set(len(self._active))
        for choice in list(request.choices):
            self._take_token(request, choice, logits)

    def _decode_step(self) -> None:
        busy = self.first_row + len(self._active)
        rows = min(max(busy, MIN_DECODE_ROWS), self.cache.batch_size) if self.pinned else busy
        view = self._view(rows)
        tokens = torch.zeros(rows, dtype=torch.long)  # (rows,): the sentinel and padding decode token 0
        for request, choice in self._active:
            tokens[choice.place] = choice.next_token
            choice.fed.append(choice.next_token)
        # Padding rows write at position 0; the sentinel sits at the last position, so that every step's
        # key range is the whole cache.
        view.lengths[busy:] = 0
        if self.first_row:
            view.lengths[0] = self.context - 1
        self.metrics.batch_size.observe(len(self._active))
        prefetch_masks([choice.state for _, choice in self._active])  # the next masks, while the model runs
        logits = self.model.decode_step(tokens.to(self.model.device), view)  # (rows, V)
        # Rows move when a choice finishes (the last row fills the gap): read logits by the row each choice
        # had during the step.
        for request, choice, place in [(r, c, c.place) for r, c in self._active]:
            if not request.cancelled:
                self._take_token(request, choice, logits[place : place + 1])

    def _view(self, rows: int):
        """A KVCache over the first `rows` rows of the shared cache (views: writes land in the shared one)."""
        if rows not in self._views:
            view = copy.copy(self.cache)
            view.keys, view.values = self.cache.keys[:, :rows], self.cache.values[:, :rows]
            view.lengths = self.cache.lengths[:rows]
            self._views[rows] = view
        return self._views[rows]

    def _take_token(self, request: GenerationRequest, choice: _Choice, logits: torch.Tensor) -> None:
        """Sample one choice's next token from its logits (1, V), report it, and free its row when done."""
        spec = request.spec
        scores = logits
        if choice.counts is not None:  # OpenAI's penalties, on the output so far
            scores = logits - spec.frequency_penalty * choice.counts - spec.presence_penalty * (choice.counts > 0)
        stop_ids = set(spec.stop_token_ids)
        if choice.state is not None:  # only what the grammar allows; logprobs stay the model's own
            scores = choice.state.mask(scores)
            stop_ids |= set(choice.state.constraint.stop_ids)
        token = int(sample(scores, spec.sampling, choice.generator, choice.seen)[0])
        end = choice.state is not None and token not in stop_ids and (not choice.state.advance(token)
                                                                       or choice.state.done)
        logprob = top = None
        if spec.top_logprobs is not None:
            logprobs = torch.log_softmax(logits[0].double(), dim=-1)  # (V,) the model's own distribution
            logprob, top = float(logprobs[token]), _top(logprobs, spec.top_logprobs)
        added = len(choice.row.tokens)
        text = "".join(_advance(choice.row, token, stop_ids, list(spec.stop_strings), end))
        added = len(choice.row.tokens) > added
        if added:
            if choice.seen is not None:
                mark_seen(choice.seen, torch.tensor([[token]], device=choice.seen.device))
            if choice.counts is not None:
                choice.counts[0, token] += 1
            self.metrics.generation_tokens.inc()
        now = time.perf_counter()
        if choice.row.tokens and len(choice.row.tokens) > 1 and added:
            self.metrics.inter_token_latency.observe(now - choice.last_token_time)
        choice.last_token_time = now
        finish = choice.row.finish
        reason = None if finish is None else _FINISH.get(finish, "stop")
        request.on_event(TokenEvent(choice.index, token if added else None, text, logprob if added else None,
                                    top if added else None, reason))
        if finish is None:
            choice.next_token = token
            return
        # The row holds the prompt's and every fed token's K/V: a later turn that repeats them reuses them.
        self._keep_prefix(spec.prompt + choice.fed, self.cache, choice.place, len(spec.prompt) + len(choice.fed))
        self._free_row(choice)
        if request.finished:
            self.metrics.finished.labels("done").inc()
            request.on_event(DoneEvent(len(spec.prompt), [len(c.row.tokens) for c in request.choices],
                                       request.cached_tokens))

    def _fail_all(self, message: str) -> None:
        """Answer every accepted request with an error and start from empty rows."""
        requests = {id(r): r for r, _ in self._active}
        if self._prefilling is not None:
            requests[id(self._prefilling)] = self._prefilling
        with self._wake:
            requests.update({id(r): r for r in self._waiting})
            self._waiting.clear()
            self.metrics.waiting.set(0)
        self._prefilling = None
        for request in requests.values():
            self._release(request, "error")
            request.on_event(ErrorEvent(message))


def chunk_end(start: int, total: int, chunk: int) -> int:
    """Where the prefill chunk that begins at `start` of a `total`-token prompt ends: `chunk` tokens on,
    or the end of the prompt when at most chunk // 4 would be left. A short remainder rides along: a
    pass of its own would read every weight again (a 512-token prompt plus its BOS is 513 tokens)."""
    end = min(start + chunk, total)
    return total if total - end <= chunk // 4 else end


def attention_is_row_independent() -> bool:
    """Whether attention gives a row the same output wherever it sits in a batch, in this process."""
    gen = torch.Generator().manual_seed(0)
    rows, heads, keys, dim = 17, 4, 64, 32
    q, k, v = (torch.randn(rows, heads, n, dim, generator=gen) for n in (1, keys, keys))
    lengths = torch.randint(1, keys + 1, (rows,), generator=gen)
    for place in (rows - 2, rows // 2):
        q2, k2, v2, lengths2 = q.clone(), k.clone(), v.clone(), lengths.clone()
        q2[place], k2[place], v2[place], lengths2[place] = q[0], k[0], v[0], lengths[0]
        outs = [F.scaled_dot_product_attention(a, b, c, attn_mask=(torch.arange(keys) < n[:, None])[:, None, None])
                for a, b, c, n in ((q, k, v, lengths), (q2, k2, v2, lengths2))]
        if not torch.equal(outs[0][0], outs[1][place]):
            return False
    return True


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) of a (V,) logprob row, most likely first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))
