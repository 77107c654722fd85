"""The HTTP side: a FastAPI app that turns OpenAI-style requests into engine requests and engine events into
JSON responses or server-sent events.

Everything here runs on the event loop and never touches the model: the engine's scheduler thread hands
events over with `loop.call_soon_threadsafe`. Bad input of any kind becomes a 400 with an OpenAI-style error
body whose `param` names the field; only a failure of the engine itself is a 500.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psutil
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import runtime
from ..errors import CheckpointError, InputError, PyBitNetError
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .engine import (DoneEvent, Draining, Engine, ErrorEvent, GenerationRequest, GenerationSpec, PromptLogprobsEvent,
                     QueueFull, TokenEvent)
from .guided import compile_requested, prepare_quietly, requested
from .metrics import ServerMetrics
from .prefix_cache import DEFAULT_BUDGET_MB, PrefixCache
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, ErrorResponse, HealthResponse, ModelCard, ModelList,
                       MAX_STOP_CHARS, MAX_STOP_STRINGS, TokenizeRequest, TokenizeResponse)
from .tools import CallStream, ToolSetup, assistant_message, chat_messages, new_call_id, parse_tools

log = logging.getLogger("pybitnet.serve")

# The chat format for a model whose tokenizer brings no template and is not a LLaMA-3 vocabulary (those get
# the 2B-4T format, which Tokenizer.apply_chat_template already applies). Same shape as llama-server's default.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"
# Seconds a client is told to wait when the queue is full.
RETRY_AFTER_S = 1
# Request bodies above this are refused (413) before they are read: a body becomes Python objects several
# times its size, and a burst of them grows the process for good.
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
# Prompt text of more than context x this many characters cannot fit the context (a token is a few
# characters), so it is refused before it is tokenized.
PROMPT_CHARS_PER_TOKEN = 32
# Threads that tokenize prompts and render chat templates, so the event loop never waits on them.
PREPARE_THREADS = 2
# After a request body of at least this size, freed heap memory is handed back to the system.
TRIM_AFTER_BYTES = 1 << 20
# Share of the memory available once the model is loaded that the KV cache of the default context (the
# model's own) may take; the rest is left for prefill activations and the prefix cache.
CACHE_MEMORY_SHARE = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


@dataclass
class ServerSettings:
    model_name: str = "pybitnet"
    max_batch: int = 16
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies are a 413, unread
    docs: bool = False  # serve /docs and /redoc (their pages load scripts from a CDN)
    max_queue: int = 64
    max_tokens_default: int = 256
    api_key: str | None = None
    context: int | None = None  # cache positions per row; default the model's max_position_embeddings
    prefill_chunk: int = 512
    batch_invariant: bool = True
    prefix_cache_mb: int = DEFAULT_BUDGET_MB  # K/V of earlier prompts kept for reuse; 0 turns reuse off
    prefix_cache_dir: str | None = None  # where the prefix cache is loaded from at start and saved at shutdown


@dataclass
class ServerState:
    """What the app knows about the model: loading -> ok (or failed) -> draining."""

    settings: ServerSettings
    status: str = "loading"
    error: str | None = None
    engine: Engine | None = None
    tokenizer: Tokenizer | None = None
    chat_tokenizer: Tokenizer | None = None  # the tokenizer whose template renders chats
    chat_stops: tuple[list[int], list[str]] = ([], [])  # extra stop ids / strings of the chat format
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    in_flight: int = 0  # HTTP requests being answered (a draining server waits for 0)
    prefix_cache_saved: bool = False  # written to --prefix-cache-dir at shutdown
    prepare_limiter: anyio.CapacityLimiter | None = None  # threads that tokenize (made on the event loop)
    trimming: bool = False  # a malloc_trim is under way
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self) -> Engine:
        if self.status == "ok" or (self.status == "draining" and self.engine is not None):
            return self.engine
        if self.status == "failed":
            raise ApiError(503, f"the model failed to load: {self.error}", kind="server_error")
        raise ApiError(503, "the model is still loading", kind="server_error", headers={"Retry-After": "5"})

    def drain(self) -> None:
        if self.engine is not None:
            self.engine.drain()
        if self.status in ("ok", "loading"):
            self.status = "draining"

    def drained(self) -> bool:
        return (self.engine is None or self.engine.idle()) and self.in_flight == 0


def create_app(load: Callable[[], tuple[Any, Tokenizer | None]], settings: ServerSettings | None = None) -> FastAPI:
    """An app serving the model that `load()` returns (model, tokenizer or None); it loads in a thread, so
    /health answers 503 until the model is ready."""
    state = ServerState(settings or ServerSettings())
    load = _fitting_context(load, state)

    def load_in_background() -> None:
        try:
            model, tokenizer = load()
            s = state.settings
            prefix_cache = None
            if s.prefix_cache_mb > 0:
                prefix_cache = PrefixCache.for_model(model, s.prefix_cache_mb << 20)
                if s.prefix_cache_dir is not None:
                    loaded = prefix_cache.load_file(s.prefix_cache_dir)
                    state.metrics.prefix_cache_bytes.set(prefix_cache.bytes_used)
                    log.info("prefix cache: %d blocks loaded from %s", loaded, s.prefix_cache_dir)
            engine = Engine(model, tokenizer, max_batch=s.max_batch, max_queue=s.max_queue, context=s.context,
                            prefill_chunk=s.prefill_chunk, batch_invariant=s.batch_invariant,
                            metrics=state.metrics, prefix_cache=prefix_cache)
            state.tokenizer = tokenizer
            state.chat_tokenizer, state.chat_stops = _chat_format(tokenizer)
            engine.start()
            if tokenizer is not None:  # the vocabulary as the constraint library sees it, ready for the first schema
                threading.Thread(target=prepare_quietly, args=(tokenizer, engine.vocab_size, state.chat_stops[0]),
                                 name="pybitnet-constraints", daemon=True).start()
            state.engine = engine
            if state.status == "loading":
                state.status = "ok"
            else:  # SIGTERM arrived while loading
                engine.drain()
        except Exception as err:  # reported by /health and every request, never a crash
            state.status, state.error = "failed", f"{type(err).__name__}: {err}"

    async def lifespan(app: FastAPI):
        threading.Thread(target=load_in_background, name="pybitnet-load", daemon=True).start()
        yield
        if state.engine is not None:  # joining the scheduler and writing the cache are not the event loop's work
            engine = state.engine
            await asyncio.to_thread(lambda: (engine.stop(timeout=5), save_prefix_cache(state)))

    docs = state.settings.docs
    app = FastAPI(title="pybitnet", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for BitNet b1.58 models",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.server = state
    _install_error_handlers(app)
    app.add_middleware(_InFlight, state=state)
    app.add_middleware(_BodyLimit, state=state)  # outermost: a request is in flight once its body is whole
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = state.settings.api_key
        if key is not None and (credentials is None or credentials.credentials != key):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           kind="authentication_error")

    # The schema declares bearer auth only when a key is required, so it describes the running server.
    guarded = [Depends(authorized)] if state.settings.api_key is not None else []
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 413, 500, 503)}
    streamed = {200: {"content": {"text/event-stream": {}}}}

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health():
        if state.status == "ok":
            return {"status": "ok"}
        return JSONResponse({"status": state.status}, status_code=503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=errors, dependencies=guarded)
    async def models():
        engine = state.ready()
        card = ModelCard(id=state.settings.model_name, created=state.created, max_model_len=engine.context)
        return ModelList(data=[card])

    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors, dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        engine = state.ready()
        tokenizer = _need_tokenizer(state, "content")
        _check_text(body.content, "content", engine)

        def encode() -> list[int]:
            _check_unicode(body.content, "content")
            return tokenizer.encode(body.content, add_special_tokens=body.add_special)

        return TokenizeResponse(tokens=await _off_loop(state, encode))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors, dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        engine = state.ready()
        tokenizer = _need_tokenizer(state, "tokens")
        _check_ids(body.tokens, engine.vocab_size, "tokens")
        return DetokenizeResponse(content=tokenizer.decode(body.tokens))

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**errors, **streamed},
              dependencies=guarded)
    async def completions(body: CompletionRequest, raw: Request):
        engine = state.ready()
        _check_rows(_prompt_count(body.prompt), body.n, engine)
        prompts = await _off_loop(state, _completion_prompts, body.prompt, state.tokenizer, engine)
        stops = list(state.tokenizer.stop_token_ids) if state.tokenizer is not None else []
        specs = [_spec(body, ids, body.max_tokens, body.logprobs, body.echo and body.logprobs is not None,
                       stops, [], state) for ids, _ in prompts]
        wanted = requested(body, None)
        if wanted is not None:  # compiled before the request is queued: a bad one is a 400
            constraint = await _off_loop(state, compile_requested, wanted, state.tokenizer, engine.vocab_size,
                                         specs[0].stop_token_ids)
            for spec in specs:
                spec.constraint = constraint
        call = _Call(engine, specs, body.n)
        await call.submit()
        echo = [text for _, text in prompts] if body.echo else None
        if body.stream:
            return EventSourceResponse(_stream_completion(call, body, echo, state), ping=15)
        return await _complete_completion(call, body, echo, state, raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**errors, **streamed},
              dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        engine = state.ready()
        tokenizer = state.chat_tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so it cannot chat; use /v1/completions with "
                                "token ids", param="messages")
        setup = parse_tools(body.tools, body.tool_choice)
        messages, template_tools = chat_messages(body.messages, setup, tokenizer.chat_template)
        _check_text("".join(m["content"] for m in messages), "messages", engine)
        ids = await _off_loop(state, _encode_chat, tokenizer, messages, template_tools)
        if not ids:
            raise ApiError(400, "the conversation renders to an empty prompt", param="messages")
        _check_prompt_length(ids, engine, "messages")
        stop_ids, stop_strings = state.chat_stops
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        limit = body.max_completion_tokens or body.max_tokens
        spec = _spec(body, ids, limit, top, False, list(tokenizer.stop_token_ids) + stop_ids, stop_strings, state)
        wanted = requested(body, setup)
        if wanted is not None:  # compiled before the request is queued: a bad one is a 400
            spec.constraint = await _off_loop(state, compile_requested, wanted, tokenizer, engine.vocab_size,
                                              spec.stop_token_ids)
        tools = setup if setup is not None and setup.constrained else None
        call = _Call(engine, [spec], body.n)
        await call.submit()
        if body.stream:
            return EventSourceResponse(_stream_chat(call, body, state, tools), ping=15)
        return await _complete_chat(call, body, state, raw, tools)

    return app


# -- request preparation -----------------------------------------------------------------------------------------


def _chat_format(tokenizer: Tokenizer | None) -> tuple[Tokenizer | None, tuple[list[int], list[str]]]:
    """The tokenizer that renders chats, plus the extra stops its format needs."""
    if tokenizer is None:
        return None, ([], [])
    if tokenizer.chat_template is not None or tokenizer.eot_token == "<|eot_id|>":
        return tokenizer, ([], [])
    chatml = copy.copy(tokenizer)
    chatml.chat_template = CHATML_TEMPLATE
    end = tokenizer.token_to_id(CHATML_END)
    return chatml, ([end], []) if end is not None else ([], [CHATML_END])


def _fitting_context(load: Callable[[], tuple[Any, Tokenizer | None]], state: ServerState):
    """`load`, followed by a cap on the default context (the model's own) at what fits in memory: a model may
    declare a million positions, and the cache holds every position of every row."""

    def load_and_fit():
        model, tokenizer = load()
        settings = state.settings
        if settings.context is None:
            c = model.config
            element = _element_bytes(model)
            per_position = 2 * c.num_layers * c.num_kv_heads * c.head_dim * element * (settings.max_batch + 2)
            available = psutil.virtual_memory().available
            fits = int(available * CACHE_MEMORY_SHARE // per_position)
            limit = int(c.max_position_embeddings)
            if fits < limit:
                if fits < 2:
                    raise InputError(f"the KV cache does not fit in memory ({available >> 20} MiB available); "
                                     f"lower --max-batch or set --ctx")
                log.warning("context capped at %d positions: the model's %d would need a %.1f GiB KV cache for %d "
                            "rows, and %.1f GiB of memory is available (--ctx sets it)", fits, limit,
                            per_position * limit / 2**30, settings.max_batch, available / 2**30)
                state.settings = dataclasses.replace(settings, context=fits)
        return model, tokenizer

    return load_and_fit


def _element_bytes(model) -> int:
    dtype = getattr(model, "dtype", None)
    return int(getattr(dtype, "itemsize", 4) or 4)


async def _off_loop(state: ServerState, fn: Callable, *args):
    """fn(*args) in one of the PREPARE_THREADS worker threads: the event loop keeps answering meanwhile."""
    if state.prepare_limiter is None:
        state.prepare_limiter = anyio.CapacityLimiter(PREPARE_THREADS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=state.prepare_limiter)


def _check_text(text: str, param: str, engine: Engine) -> None:
    """Refuse text that cannot fit the context, by its length alone (before any work on it)."""
    limit = engine.context * PROMPT_CHARS_PER_TOKEN
    if len(text) > limit:
        raise ApiError(400, f"{param} is {len(text)} characters, more than a context of {engine.context} tokens can "
                            f"hold (at most {limit} characters are accepted)", param=param)


def _check_unicode(text: str, param: str) -> None:
    """Refuse text that is not Unicode a tokenizer can take: a lone surrogate such as \\ud800 (valid JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"{param} holds a lone surrogate ({text[err.start]!r} at character {err.start}), "
                            f"which is not valid Unicode text", param=param) from None


def _check_rows(prompts: int, n: int, engine: Engine) -> None:
    if prompts * n > engine.max_batch:
        raise ApiError(400, f"{prompts} prompts x n={n} choices need more rows than the server has "
                            f"(max batch {engine.max_batch})", param="n")


def _prompt_count(prompt) -> int:
    if isinstance(prompt, str) or not prompt or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def _encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], tools: list | None = None) -> list[int]:
    """Render and tokenize a conversation (in a worker thread). A template that refuses the conversation is
    the client's error (400); one that fails is the server's (500), told without the model's file path.
    `tools`: handed to a template that renders them (serve/tools.py)."""
    for message in messages:
        _check_unicode(message["content"], "messages")
    try:
        return tokenizer.encode_chat(messages) if tools is None else tokenizer.encode_chat(messages, tools=tools)
    except InputError as err:
        raise ApiError(400, str(err), param="messages") from None
    except CheckpointError as err:
        message = str(err).replace(f"chat template of {tokenizer.source}", "the model's chat template")
        message = message.replace(str(tokenizer.source), "the model")
        raise ApiError(500, message, kind="server_error") from None


def _need_tokenizer(state: ServerState, param: str) -> Tokenizer:
    if state.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer; send token ids instead of text", param=param)
    return state.tokenizer


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is out of range: ids must lie in [0, {vocab})", param=param)


def _check_prompt_length(ids: list[int], engine: Engine, param: str) -> None:
    if len(ids) + 1 > engine.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the context is {engine.context} tokens, "
                            f"leaving no room to generate", param=param)


def _completion_prompts(prompt, tokenizer: Tokenizer | None, engine: Engine) -> list[tuple[list[int], str]]:
    """(token ids, text to echo) per prompt (in a worker thread: tokenizing may take a while)."""
    vocab = engine.vocab_size
    if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
        for text in texts:
            if not text:
                raise ApiError(400, "the prompt is empty", param="prompt")
            _check_text(text, "prompt", engine)
            _check_unicode(text, "prompt")
        return [(tokenizer.encode(text), text) for text in texts]
    lists = [prompt] if prompt and all(isinstance(p, int) for p in prompt) else list(prompt)
    if not lists or any(not ids for ids in lists):
        raise ApiError(400, "the prompt is empty", param="prompt")
    out = []
    for ids in lists:
        _check_ids(ids, vocab, "prompt")
        out.append((list(ids), tokenizer.decode(ids) if tokenizer is not None else ""))
    return out


def _spec(body, ids: list[int], max_tokens: int | None, top_logprobs: int | None, prompt_logprobs: bool,
          stop_ids: list[int], stop_strings: list[str], state: ServerState) -> GenerationSpec:
    engine = state.engine
    _check_prompt_length(ids, engine, "prompt")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must be non-empty", param="stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each "
                            f"are accepted; got {len(stops)}, the longest {max(map(len, stops))} characters",
                       param="stop")
    if stops and state.tokenizer is None:
        raise ApiError(400, "stop strings need a tokenizer; this model has none", param="stop")
    try:
        sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty)
    except InputError as err:
        raise ApiError(400, str(err), param=str(err).split(" ", 1)[0]) from None
    return GenerationSpec(
        prompt=ids, max_tokens=max_tokens or state.settings.max_tokens_default, sampling=sampling, seed=body.seed,
        n=body.n, stop_token_ids=[] if body.ignore_eos else stop_ids, stop_strings=stop_strings + stops,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
    )


# -- one HTTP call: its engine requests and their events ---------------------------------------------------------


class _Call:
    """The engine requests of one HTTP request (one per prompt) and the queue their events arrive on."""

    def __init__(self, engine: Engine, specs: list[GenerationSpec], n: int):
        self.engine, self.specs, self.n = engine, specs, n
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests: list[GenerationRequest] = []
        self.open = len(specs)  # engine requests not yet done
        self.watcher: asyncio.Task | None = None  # waits for the client of a non-streaming call to hang up

    async def submit(self) -> None:
        _check_rows(len(self.specs), self.n, self.engine)
        loop = asyncio.get_running_loop()
        try:
            for i, spec in enumerate(self.specs):
                def deliver(event, i=i):
                    try:
                        loop.call_soon_threadsafe(self.events.put_nowait, (i, event))
                    except RuntimeError:  # the loop closed under a late event: nobody is listening
                        pass
                self.requests.append(self.engine.submit(spec, deliver))
        except (QueueFull, Draining) as err:
            self.cancel()
            raise ApiError(503, str(err), kind="server_overloaded" if isinstance(err, QueueFull) else "server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except InputError as err:
            self.cancel()
            raise ApiError(400, str(err), param="prompt") from None

    def cancel(self) -> None:
        for request in self.requests:
            self.engine.cancel(request)

    async def next(self, raw: Request | None = None):
        """The next (prompt index, event); with `raw`, raises _Disconnected once the client is gone (its engine
        requests are cancelled the moment it hangs up, however many events are coming)."""
        if raw is not None and self.watcher is None:
            self.watcher = asyncio.ensure_future(self._watch(raw))
        i, event = await self.events.get()
        if event is _GONE:
            raise _Disconnected()
        return i, event

    async def _watch(self, raw: Request) -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass
        self.cancel()
        self.events.put_nowait((-1, _GONE))

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


class _Disconnected(Exception):
    pass


_GONE = object()  # the event a watcher queues when the client hung up


@dataclass
class _ChoiceOut:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: str | None = None


def _token_text(tokenizer: Tokenizer | None, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else f"token_id:{token}"


def _usage(done: dict[int, DoneEvent]) -> dict:
    prompt = sum(d.prompt_tokens for d in done.values())  # a prompt counts once, however many choices
    completion = sum(sum(d.completion_tokens) for d in done.values())
    cached = sum(d.cached_tokens for d in done.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def save_prefix_cache(state: ServerState) -> None:
    """Write the prefix cache to --prefix-cache-dir once the scheduler has stopped (once per server: the app's
    shutdown and a forced exit both ask); a failure is logged, not raised."""
    engine, directory = state.engine, state.settings.prefix_cache_dir
    if directory is None or engine is None or engine.prefix_cache is None or engine.running() \
            or state.prefix_cache_saved:
        return
    state.prefix_cache_saved = True
    try:
        path = engine.prefix_cache.save(directory)
        log.info("prefix cache: %d blocks saved to %s", engine.prefix_cache.blocks, path)
    except OSError as err:
        log.warning("prefix cache not saved to %s: %s", directory, err)


async def _collect(call: _Call, raw: Request):
    """Wait for every event of a non-streaming call: per-choice outputs, prompt logprobs, done events."""
    outs = {(i, j): _ChoiceOut() for i in range(len(call.specs)) for j in range(call.n)}
    prompt_lp: dict[int, PromptLogprobsEvent] = {}
    done: dict[int, DoneEvent] = {}
    try:
        while call.open:
            i, event = await call.next(raw)
            if isinstance(event, TokenEvent):
                out = outs[(i, event.choice)]
                out.text += event.text
                if event.token is not None:
                    out.tokens.append(event.token)
                    if event.logprob is not None:
                        out.logprobs.append(event.logprob)
                        out.top.append(event.top_logprobs or [])
                out.finish = event.finish_reason or out.finish
            elif isinstance(event, PromptLogprobsEvent):
                prompt_lp[i] = event
            elif isinstance(event, DoneEvent):
                done[i] = event
                call.open -= 1
            elif isinstance(event, ErrorEvent):
                raise ApiError(500, event.message, kind="server_error")
    except BaseException:
        call.cancel()  # disconnected, failed or cancelled: free the rows now
        raise
    finally:
        call.stop_watching()
    return outs, prompt_lp, done


def _completion_logprobs(tokenizer, tokens: list[int], logprobs: list[float | None],
                         top: list[list[tuple[int, float]] | None], offset: int = 0) -> dict:
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    tops = [None if t is None else {_token_text(tokenizer, tid): lp for tid, lp in t} for t in top]
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


async def _complete_completion(call: _Call, body: CompletionRequest, echo: list[str] | None, state: ServerState,
                               raw: Request):
    try:
        outs, prompt_lp, done = await _collect(call, raw)
    except _Disconnected:
        return Response(status_code=499)
    tokenizer = state.tokenizer
    choices = []
    for (i, j), out in sorted(outs.items()):
        prefix = echo[i] if echo is not None else ""
        logprobs = None
        if body.logprobs is not None:
            tokens, lps, tops = out.tokens, list(out.logprobs), list(out.top)
            if echo is not None and i in prompt_lp:
                tokens = call.specs[i].prompt + tokens
                lps = prompt_lp[i].logprobs + lps
                tops = prompt_lp[i].top_logprobs + tops
            logprobs = _completion_logprobs(tokenizer, tokens, lps, tops)
        choices.append({"index": i * call.n + j, "text": prefix + out.text, "token_ids": out.tokens,
                        "logprobs": logprobs, "finish_reason": out.finish})
    return {"id": f"cmpl-{call.id}", "object": "text_completion", "created": call.created,
            "model": state.settings.model_name, "choices": choices, "usage": _usage(done)}


def _chat_logprobs(tokenizer, tokens: list[int], logprobs: list[float], top: list[list[tuple[int, float]]]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in alts]}
                        for t, lp, alts in zip(tokens, logprobs, top)]}


async def _complete_chat(call: _Call, body: ChatCompletionRequest, state: ServerState, raw: Request,
                         tools: ToolSetup | None = None):
    try:
        outs, _, done = await _collect(call, raw)
    except _Disconnected:
        return Response(status_code=499)
    choices = []
    for (_, j), out in sorted(outs.items()):
        logprobs = _chat_logprobs(state.tokenizer, out.tokens, out.logprobs, out.top) if body.logprobs else None
        message, finish = {"role": "assistant", "content": out.text}, out.finish
        if tools is not None:  # a whole call becomes message.tool_calls
            message, finish = assistant_message(out.text, out.finish, tools, new_call_id())
        choices.append({"index": j, "message": message, "token_ids": out.tokens,
                        "logprobs": logprobs, "finish_reason": finish})
    return {"id": f"chatcmpl-{call.id}", "object": "chat.completion", "created": call.created,
            "model": state.settings.model_name, "choices": choices, "usage": _usage(done)}


# -- streaming ---------------------------------------------------------------------------------------------------


async def _stream_events(call: _Call) -> AsyncIterator[tuple[int, object]]:
    """Every event of the call until all its requests are done; a client that goes away (the generator is
    closed or cancelled) cancels them."""
    try:
        while call.open:
            i, event = await call.next()
            if isinstance(event, DoneEvent):
                call.open -= 1
            yield i, event
    finally:
        if call.open:
            call.cancel()


def _json(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _error_chunk(event: ErrorEvent) -> str:
    return _json({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})


async def _stream_completion(call: _Call, body: CompletionRequest, echo: list[str] | None, state: ServerState):
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    head = {"id": f"cmpl-{call.id}", "object": "text_completion", "created": call.created,
            "model": state.settings.model_name}
    extra = {"usage": None} if include_usage else {}
    tokenizer = state.tokenizer
    done: dict[int, DoneEvent] = {}

    def chunk(index: int, text: str, tokens: list[int], logprobs=None, finish=None) -> str:
        choice = {"index": index, "text": text, "token_ids": tokens, "logprobs": logprobs, "finish_reason": finish}
        return _json({**head, "choices": [choice], **extra})

    if echo is not None and body.logprobs is None:
        for i, text in enumerate(echo):
            for j in range(call.n):
                yield chunk(i * call.n + j, text, [])
    offsets: dict[int, int] = {}
    async for i, event in _stream_events(call):
        if isinstance(event, PromptLogprobsEvent) and echo is not None:
            logprobs = _completion_logprobs(tokenizer, call.specs[i].prompt, event.logprobs, event.top_logprobs)
            for j in range(call.n):
                offsets[i * call.n + j] = len(echo[i])
                yield chunk(i * call.n + j, echo[i], [], logprobs)
        elif isinstance(event, TokenEvent):
            if not (event.text or event.token is not None or event.finish_reason):
                continue
            index = i * call.n + event.choice
            tokens = [event.token] if event.token is not None else []
            logprobs = None
            if body.logprobs is not None:
                offset = offsets.get(index, 0)
                logprobs = _completion_logprobs(tokenizer, tokens, [event.logprob] if tokens else [],
                                                [event.top_logprobs] if tokens else [], offset)
                offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
            yield chunk(index, event.text, tokens, logprobs, event.finish_reason)
        elif isinstance(event, DoneEvent):
            done[i] = event
        elif isinstance(event, ErrorEvent):
            yield _error_chunk(event)
            return
    if include_usage:
        yield _json({**head, "choices": [], "usage": _usage(done)})
    yield "[DONE]"


async def _stream_chat(call: _Call, body: ChatCompletionRequest, state: ServerState, tools: ToolSetup | None = None):
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    head = {"id": f"chatcmpl-{call.id}", "object": "chat.completion.chunk", "created": call.created,
            "model": state.settings.model_name}
    extra = {"usage": None} if include_usage else {}
    done: dict[int, DoneEvent] = {}

    def chunk(index: int, delta: dict, tokens: list[int], logprobs=None, finish=None) -> str:
        choice = {"index": index, "delta": delta, "token_ids": tokens, "logprobs": logprobs, "finish_reason": finish}
        return _json({**head, "choices": [choice], **extra})

    for j in range(call.n):
        yield chunk(j, {"role": "assistant", "content": ""}, [])
    calls = {j: CallStream(tools, new_call_id()) for j in range(call.n)} if tools is not None else None
    async for _, event in _stream_events(call):
        if isinstance(event, TokenEvent):
            if not (event.text or event.token is not None or event.finish_reason):
                continue
            tokens = [event.token] if event.token is not None else []
            logprobs = None
            if body.logprobs:
                logprobs = _chat_logprobs(state.tokenizer, tokens, [event.logprob] if tokens else [],
                                          [event.top_logprobs or []] if tokens else [])
            if calls is not None:  # content, or a tool call's deltas (serve/tools.py)
                deltas, finish = calls[event.choice].feed(event.text), event.finish_reason
                if finish:
                    last, finish = calls[event.choice].finish(finish)
                    deltas += last
                deltas = deltas or [{}]
                for k, delta in enumerate(deltas):
                    yield chunk(event.choice, delta, tokens if k == 0 else [], logprobs if k == 0 else None,
                                finish if k == len(deltas) - 1 else None)
                continue
            delta = {"content": event.text} if event.text or not event.finish_reason else {}
            yield chunk(event.choice, delta, tokens, logprobs, event.finish_reason)
        elif isinstance(event, DoneEvent):
            done[0] = event
        elif isinstance(event, ErrorEvent):
            yield _error_chunk(event)
            return
    if include_usage:
        yield _json({**head, "choices": [], "usage": _usage(done)})
    yield "[DONE]"


# -- errors and bookkeeping --------------------------------------------------------------------------------------


def _error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field_name(loc: tuple) -> str | None:
    """The request field a pydantic error location points at: ('body', 'stop', 'list[str]', 0) -> 'stop'."""
    parts = [p for p in loc[1:] if isinstance(p, str) and not any(c in p for c in "[]") and p not in
             ("str", "int", "float", "bool", "TextPart")]
    return ".".join(parts) if parts else ("body" if loc and loc[0] == "body" else None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error_response(err.status, err.message, err.param, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return _error_response(400, f"the request body is not valid JSON: {first.get('msg')}", "body")
        param = _field_name(loc)
        if param == "body" and first.get("type") == "missing" and len(loc) == 1:
            return _error_response(400, "the request needs a JSON body", "body")
        return _error_response(400, f"{param or 'request'}: {first.get('msg')}", param)

    @app.exception_handler(InputError)
    async def input_error(request: Request, err: InputError):
        return _error_response(400, str(err), getattr(err, "param", None))

    @app.exception_handler(PyBitNetError)
    async def engine_error(request: Request, err: PyBitNetError):
        return _error_response(500, str(err), kind="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error_response(err.status_code, str(err.detail), kind=kind, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception):  # a bug of ours (uvicorn logs it): still JSON
        return _error_response(500, f"internal error ({type(err).__name__})", kind="server_error")


class _BodyLimit:
    """ASGI middleware: a request body larger than settings.max_request_bytes is a 413 before the app sees any
    of it. A Content-Length over the limit is refused without reading the body; a body sent without one
    (chunked) is read here, counting, and refused as soon as it passes the limit. The app then gets the body
    in one piece. After a large body, the memory it took is handed back to the system."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.settings.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _too_large(limit, declared)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was whole
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                chunks.clear()
                return await _too_large(limit, None)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        chunks.clear()

        async def replay():
            return whole.pop() if whole else await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if size >= TRIM_AFTER_BYTES:
                await _release_memory(self.state)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int, declared: int | None) -> JSONResponse:
    size = f"{declared} bytes" if declared is not None else "more than that"
    return _error_response(413, f"the request body is {size}; this server takes at most {limit} bytes "
                                f"(--max-request-bytes)", param="body")


async def _release_memory(state: ServerState) -> None:
    """Hand freed heap memory back to the system (malloc_trim) in a worker thread, one trim at a time."""
    if state.trimming:
        return
    state.trimming = True
    try:
        await anyio.to_thread.run_sync(runtime.release_memory)
    finally:
        state.trimming = False


class _InFlight:
    """ASGI middleware counting HTTP requests being answered, so a draining server knows when it is done."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
