"""Generation: a batch of ragged prompts -> one batched prefill -> batched decode steps -> tokens and text.

    generate(model, tokenizer, prompts, ...)   all rows at once; returns GenerationResult
    stream(model, tokenizer, prompt, ...)      one prompt; iterate to get text pieces as they decode

Prompts are right-padded into one (B, T) prefill with an attention mask; each row then decodes at its own cache
position. A row that stops (stop token, stop string, its token budget) leaves the batch through
cache.select_rows, so it costs no more work. The model knows nothing of text; stop strings and streaming live
here, through the tokenizer's IncrementalDecoder.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .constraints import as_constraints, prefetch_masks
from .errors import InputError
from .sampling import SamplingParams, make_generator, mark_seen, sample
from .tokenizer import IncrementalDecoder, Tokenizer

# finish reasons; GRAMMAR: the output constraint is complete and takes nothing more
STOP_TOKEN, STOP_STRING, LENGTH, CONTEXT, GRAMMAR = "stop_token", "stop_string", "length", "context", "grammar"


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]  # what was fed, after any truncation
    token_ids: list[list[int]]  # generated ids per prompt; a stop token that ended a row is not included
    texts: list[str] | None  # decoded output per prompt (cut before a stop string); None without a tokenizer
    finish_reasons: list[str]  # stop_token | stop_string | length (max_new_tokens) | context (model's limit) | grammar
    truncated_tokens: list[int]  # prompt tokens dropped from the front of each prompt (truncate=True)
    time_to_first_token_s: float  # from the call to the first token of every row (tokenize + prefill + sample)
    decode_time_s: float  # after the first token, until the last row finished
    decode_tokens: int  # tokens sampled from decode-step logits, over all rows

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_time_s if self.decode_time_s > 0 else float("nan")

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


@dataclass
class _Row:
    """Per-prompt state while it decodes."""

    prompt: list[int]
    budget: int  # tokens this row may still produce, max_new_tokens capped by the context
    budget_reason: str  # the finish reason when the budget runs out
    decoder: IncrementalDecoder | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (after a stop string: cut before it)
    emitted: int = 0  # characters of `text` already handed out as pieces
    finish: str | None = None
    stops: "_StopMatcher | None" = None  # the stop strings' match state, made by the first _advance


def generate(
    model,
    tokenizer: Tokenizer | None,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    add_special_tokens: bool = True,
    truncate: bool = False,
    on_text: Callable[[int, str], None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    session=None,
    constraint=None,
) -> GenerationResult:
    """Generate for every prompt (text, or token ids when `tokenizer` is None or ids are given).

    session: a pybitnet.Session (one prompt): the prompt continues from the K/V the session already holds
    for its leading tokens, and afterwards the session holds the prompt and the output.

    stop_token_ids defaults to the tokenizer's EOS/EOT (none without a tokenizer). A prompt longer than the
    model's context (max_position_embeddings) is an InputError unless truncate=True, which keeps its last tokens
    (and its BOS) and reports how many were dropped in `truncated_tokens`. on_text(row, piece) streams text;
    on_token(row, token_id) streams each generated id (stop tokens are not generated output).

    constraint: a pybitnet.constraints.Constraint (JSON schema, regex, grammar) for every prompt, or a list of
    one (or None) per prompt: each row samples only tokens its grammar allows, and ends (finish reason
    "grammar") once the grammar can take nothing more, or with a stop token once it is complete.
    """
    steps = _generation_steps(model, tokenizer, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                              seed=seed, stop_token_ids=stop_token_ids, stop_strings=stop_strings,
                              add_special_tokens=add_special_tokens, truncate=truncate, on_token=on_token,
                              session=session, constraint=constraint)
    while True:
        try:
            row, piece = next(steps)
        except StopIteration as done:
            return done.value
        if on_text is not None:
            on_text(row, piece)


class TextStream:
    """Iterate for text pieces of one prompt as they decode; `.result` holds the GenerationResult afterwards."""

    def __init__(self, steps: Generator[tuple[int, str], None, GenerationResult]):
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                _, piece = next(self._steps)
            except StopIteration as done:
                self.result = done.value
                return
            yield piece

    def close(self) -> None:
        """Stop early (e.g. on Ctrl-C); no result is produced."""
        self._steps.close()


def stream(model, tokenizer: Tokenizer, prompt: str | Sequence[int], **options) -> TextStream:
    """Like generate() for one prompt, yielding text pieces (never half a UTF-8 character) as tokens decode."""
    if tokenizer is None:
        raise InputError("streaming text needs a tokenizer")
    return TextStream(_generation_steps(model, tokenizer, [prompt], **options))


# -- the loop --------------------------------------------------------------------------------------------------


def _generation_steps(model, tokenizer, prompts, *, max_new_tokens=128, sampling=None, seed=None,
                      stop_token_ids=None, stop_strings=(), add_special_tokens=True,
                      truncate=False, on_token=None, session=None, constraint=None) -> Generator[tuple[int, str], None, GenerationResult]:
    start_time = time.perf_counter()
    params = sampling if sampling is not None else SamplingParams()
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stop_strings = _check_stop_strings(stop_strings, tokenizer)
    if stop_token_ids is None:
        stop_token_ids = tokenizer.stop_token_ids if tokenizer is not None else ()
    stop_ids = {int(t) for t in stop_token_ids}
    generator = None if params.greedy else make_generator(seed, model.device)

    prompt_ids = _tokenize(tokenizer, prompts, add_special_tokens)
    context = int(model.config.max_position_embeddings)
    if session is not None:
        if len(prompt_ids) != 1:
            raise InputError(f"a session continues one prompt, got {len(prompt_ids)}")
        context = min(context, session.max_len)
    bos = tokenizer.bos_token_id if tokenizer is not None else model.config.bos_token_id
    truncated = []
    for i, ids in enumerate(prompt_ids):
        prompt_ids[i], dropped = _fit_context(ids, i, context, max_new_tokens, truncate, bos)
        truncated.append(dropped)
    rows = []
    for ids in prompt_ids:
        room = context - len(ids)  # positions left; the last sampled token is never fed back
        budget, reason = (max_new_tokens, LENGTH) if max_new_tokens <= room else (room, CONTEXT)
        decoder = IncrementalDecoder(tokenizer, ids) if tokenizer is not None else None
        rows.append(_Row(prompt=ids, budget=budget, budget_reason=reason, decoder=decoder))

    # One prefill for the whole batch: right-padded ids (B, T) + mask; logits at each row's last real token.
    batch, longest = len(rows), max(len(r.prompt) for r in rows)
    tokens = torch.zeros(batch, longest, dtype=torch.long)  # (B, T); pad id 0 is never attended to
    mask = torch.zeros(batch, longest, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        tokens[b, : len(row.prompt)] = torch.tensor(row.prompt)
        mask[b, : len(row.prompt)] = 1
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=model.device)  # (B, V)
        for b, row in enumerate(rows):
            mark_seen(seen[b : b + 1], torch.tensor([row.prompt], device=model.device))
    if session is not None:  # only what the session does not already hold is prefilled
        cache = session.cache
        logits = session.prefill(rows[0].prompt)  # (1, V)
    else:
        cache = model.new_cache(batch, longest + max(r.budget for r in rows))
        with torch.inference_mode():
            logits = model.prefill(tokens.to(model.device), cache, mask.to(model.device))  # (B, V)

    states = [c.start() if c is not None else None for c in as_constraints(constraint, batch)]  # per row
    row_stops = [stop_ids | set(s.constraint.stop_ids) if s is not None else stop_ids for s in states]

    active = list(range(batch))  # original row index of each cache row
    first_token_time = None
    decode_tokens = 0
    while True:
        if any(states):  # disallowed tokens of each constrained row at -inf
            logits = torch.cat([states[b].mask(logits[s : s + 1]) if states[b] is not None else logits[s : s + 1]
                                for s, b in enumerate(active)])
        next_tokens = sample(logits, params, generator, seen)  # (B_active,)
        if first_token_time is None:
            first_token_time = time.perf_counter()
        else:
            decode_tokens += len(active)
        keep = []
        for slot, (b, token) in enumerate(zip(active, next_tokens.tolist())):
            state = states[b]
            end = state is not None and token not in row_stops[b] and (not state.advance(token) or state.done)
            pieces = list(_advance(rows[b], token, row_stops[b], stop_strings, end))
            if on_token is not None and token not in stop_ids:
                on_token(b, token)
            for piece in pieces:
                yield b, piece
            if rows[b].finish is None:
                keep.append(slot)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch: no more cache, attention or sampling work
            index = torch.tensor(keep, device=model.device)
            cache.select_rows(index)
            next_tokens = next_tokens[index]
            seen = seen[index] if seen is not None else None
            active = [active[s] for s in keep]
        if seen is not None:
            mark_seen(seen, next_tokens)
        prefetch_masks([states[b] for b in active])  # the next masks, while the model runs
        with torch.inference_mode():
            logits = model.decode_step(next_tokens.to(model.device), cache)  # (B_active, V)
    end_time = time.perf_counter()
    if session is not None:  # every sampled token but the last was fed back: the cache holds them
        session.tokens = (rows[0].prompt + rows[0].tokens)[: int(cache.lengths[0])]

    return GenerationResult(
        prompt_ids=[r.prompt for r in rows],
        token_ids=[r.tokens for r in rows],
        texts=[r.text for r in rows] if tokenizer is not None else None,
        finish_reasons=[r.finish for r in rows],
        truncated_tokens=truncated,
        time_to_first_token_s=first_token_time - start_time,
        decode_time_s=end_time - first_token_time,
        decode_tokens=decode_tokens,
    )


def _advance(row: _Row, token: int, stop_ids: set[int], stop_strings: list[str], end: bool = False) -> Iterator[str]:
    """Take one sampled token into `row`; yield the text that is now safe to show. `end`: the row's grammar
    takes nothing after this token."""
    if token in stop_ids:
        row.finish = STOP_TOKEN
    else:
        row.tokens.append(token)
        row.budget -= 1
        if row.decoder is not None:
            row.text += row.decoder.push(token)
        if end:
            row.finish = GRAMMAR
        elif row.budget == 0:
            row.finish = row.budget_reason
    if row.finish is not None and row.decoder is not None:
        row.text += row.decoder.flush()
    if row.decoder is None:
        return
    hold = 0
    if stop_strings:
        if row.stops is None:
            row.stops = _StopMatcher(stop_strings)
        cut = row.stops.feed(row.text)
        if cut is not None:
            row.text, row.finish = row.text[:cut], STOP_STRING
        elif row.finish is None:
            hold = row.stops.held()  # might be the start of a stop string
    end = len(row.text) - hold
    if end > row.emitted:
        piece, row.emitted = row.text[row.emitted:end], end
        yield piece


class _StopMatcher:
    """Stop strings matched against a row's growing text in time linear in the text.

    Each stop string has a Knuth-Morris-Pratt state: the length of the longest end of the text so far that
    is a start of that string. Each call reads only the characters added since the last one, so a token
    costs O(new characters x stop strings) however long the text or the stop strings are, and the text to
    hold back (what might still become a stop string) is the largest state.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.strings = list(stop_strings)
        self.tables = [_kmp_table(s) for s in self.strings]
        self.states = [0] * len(self.strings)
        self.scanned = 0  # characters of the text already read

    def feed(self, text: str) -> int | None:
        """Read text[scanned:]; the start of the earliest stop string that is now complete, if any."""
        base, new = self.scanned, text[self.scanned:]
        self.scanned = len(text)
        earliest = None
        for k, stop in enumerate(self.strings):
            q = self.states[k]
            if q == 0 and stop[0] not in new:  # the usual case, at C speed
                continue
            table, n = self.tables[k], len(stop)
            for i, char in enumerate(new):
                while q and stop[q] != char:
                    q = table[q - 1]
                if stop[q] == char:
                    q += 1
                if q == n:  # complete; a later match of this string would start later
                    start = base + i + 1 - n
                    earliest = start if earliest is None else min(earliest, start)
                    q = table[q - 1]
                    break
            self.states[k] = q
        return earliest

    def held(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        return max(self.states, default=0)


@functools.lru_cache(maxsize=256)
def _kmp_table(stop: str) -> tuple[int, ...]:
    """table[i]: the length of the longest proper prefix of stop[:i + 1] that is also its suffix."""
    table = [0] * len(stop)
    q = 0
    for i in range(1, len(stop)):
        while q and stop[i] != stop[q]:
            q = table[q - 1]
        if stop[i] == stop[q]:
            q += 1
        table[i] = q
    return tuple(table)


# -- inputs ------------------------------------------------------------------------------------------------------


def _tokenize(tokenizer, prompts, add_special_tokens: bool) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    elif isinstance(prompts, Sequence) and prompts and all(isinstance(p, int) for p in prompts):
        prompts = [prompts]  # one prompt given as a flat list of ids
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)) or len(prompts) == 0:
        raise InputError("prompts must be a non-empty list of strings or of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InputError("text prompts need a tokenizer; pass token ids, or load a model that has one")
            if not prompt:
                raise InputError(f"prompt {i} is empty")
            ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, torch.Tensor) or (isinstance(prompt, Sequence) and not isinstance(prompt, bytes)):
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        else:
            raise InputError(f"prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InputError(f"prompt {i} is empty (no tokens)")
        out.append(ids)
    return out


def _fit_context(ids: list[int], index: int, context: int, max_new_tokens: int, truncate: bool,
                 bos: int | None) -> tuple[list[int], int]:
    """The prompt as fed and how many tokens were dropped from its front."""
    if len(ids) < context:
        return ids, 0
    if not truncate:
        raise InputError(
            f"prompt {index} is {len(ids)} tokens but the model's context is {context} tokens "
            f"(max_position_embeddings), leaving no room to generate; shorten it, or pass truncate=True "
            f"(--truncate on the command line) to keep its last tokens"
        )
    keep = max(context - max_new_tokens, 1)
    head = [ids[0]] if bos is not None and ids[0] == bos and keep > 1 else []  # keep BOS: models expect it
    tail = ids[len(ids) - (keep - len(head)):]
    return head + tail, len(ids) - len(head) - len(tail)


def _check_stop_strings(stop_strings, tokenizer) -> list[str]:
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings)
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise InputError(f"stop strings must be non-empty strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise InputError("stop strings need a tokenizer")
    return stop_strings
