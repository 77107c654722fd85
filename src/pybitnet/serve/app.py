"""The HTTP side: a FastAPI app that turns OpenAI-style requests into engine requests and engine events into
JSON responses or server-sent events.

Everything here runs on the event loop and never touches the model: the engine's scheduler thread hands
events over with `loop.call_soon_threadsafe`. Bad input of any kind becomes a 400 with an OpenAI-style error
body whose `param` names the field; only a failure of the engine itself is a 500.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, PyBitNetError
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .engine import (DoneEvent, Draining, Engine, ErrorEvent, GenerationRequest, GenerationSpec, PromptLogprobsEvent,
                     QueueFull, TokenEvent)
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, ErrorResponse, HealthResponse, ModelCard, ModelList,
                       TokenizeRequest, TokenizeResponse)

# The chat format for a model whose tokenizer brings no template and is not a LLaMA-3 vocabulary (those get
# the 2B-4T format, which Tokenizer.apply_chat_template already applies). Same shape as llama-server's default.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"
# Seconds a client is told to wait when the queue is full.
RETRY_AFTER_S = 1
# How often a non-streaming request checks that its client is still connected.
DISCONNECT_POLL_S = 0.1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


@dataclass
class ServerSettings:
    model_name: str = "pybitnet"
    max_batch: int = 16
    max_queue: int = 64
    max_tokens_default: int = 256
    api_key: str | None = None
    context: int | None = None  # cache positions per row; default the model's max_position_embeddings
    prefill_chunk: int = 512
    batch_invariant: bool = True


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

    def load_in_background() -> None:
        try:
            model, tokenizer = load()
            s = state.settings
            engine = Engine(model, tokenizer, max_batch=s.max_batch, max_queue=s.max_queue, context=s.context,
                            prefill_chunk=s.prefill_chunk, batch_invariant=s.batch_invariant,
                            metrics=state.metrics)
            state.tokenizer = tokenizer
            state.chat_tokenizer, state.chat_stops = _chat_format(tokenizer)
            engine.start()
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
        if state.engine is not None:
            state.engine.stop(timeout=5)

    app = FastAPI(title="pybitnet", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for BitNet b1.58 models")
    app.state.server = state
    _install_error_handlers(app)
    app.add_middleware(_InFlight, state=state)
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = state.settings.api_key
        if key is not None and (credentials is None or credentials.credentials != key):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           kind="authentication_error")

    # The schema declares bearer auth only when a key is required, so it describes the running server.
    guarded = [Depends(authorized)] if state.settings.api_key is not None else []
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 500, 503)}
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
        state.ready()
        tokenizer = _need_tokenizer(state, "content")
        return TokenizeResponse(tokens=tokenizer.encode(body.content, add_special_tokens=body.add_special))

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
        prompts = _completion_prompts(body.prompt, state.tokenizer, engine.vocab_size)
        stops = list(state.tokenizer.stop_token_ids) if state.tokenizer is not None else []
        specs = [_spec(body, ids, body.max_tokens, body.logprobs, body.echo and body.logprobs is not None,
                       stops, [], state) for ids, _ in prompts]
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
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in body.messages]
        ids = tokenizer.encode_chat(messages)
        if not ids:
            raise ApiError(400, "the conversation renders to an empty prompt", param="messages")
        _check_prompt_length(ids, engine, "messages")
        stop_ids, stop_strings = state.chat_stops
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        limit = body.max_completion_tokens or body.max_tokens
        spec = _spec(body, ids, limit, top, False, list(tokenizer.stop_token_ids) + stop_ids, stop_strings, state)
        call = _Call(engine, [spec], body.n)
        await call.submit()
        if body.stream:
            return EventSourceResponse(_stream_chat(call, body, state), ping=15)
        return await _complete_chat(call, body, state, raw)

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


def _completion_prompts(prompt, tokenizer: Tokenizer | None, vocab: int) -> list[tuple[list[int], str]]:
    """(token ids, text to echo) per prompt."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
        out = []
        for text in texts:
            if not text:
                raise ApiError(400, "the prompt is empty", param="prompt")
            out.append((tokenizer.encode(text), text))
        return out
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

    async def submit(self) -> None:
        if len(self.specs) * self.n > self.engine.max_batch:
            raise ApiError(400, f"{len(self.specs)} prompts x n={self.n} choices need more rows than the "
                                f"server has (max batch {self.engine.max_batch})", param="n")
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
        """The next (prompt index, event); with `raw`, raises _Disconnected when the client is gone."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S if raw is not None else None)
            except asyncio.TimeoutError:
                if await raw.is_disconnected():
                    raise _Disconnected() from None


class _Disconnected(Exception):
    pass


@dataclass
class _ChoiceOut:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: str | None = None


def _token_text(tokenizer: Tokenizer | None, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else f"token_id:{token}"


def _usage(done: dict[int, DoneEvent]) -> dict[str, int]:
    prompt = sum(d.prompt_tokens for d in done.values())  # a prompt counts once, however many choices
    completion = sum(sum(d.completion_tokens) for d in done.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


async def _complete_chat(call: _Call, body: ChatCompletionRequest, state: ServerState, raw: Request):
    try:
        outs, _, done = await _collect(call, raw)
    except _Disconnected:
        return Response(status_code=499)
    choices = []
    for (_, j), out in sorted(outs.items()):
        logprobs = _chat_logprobs(state.tokenizer, out.tokens, out.logprobs, out.top) if body.logprobs else None
        choices.append({"index": j, "message": {"role": "assistant", "content": out.text}, "token_ids": out.tokens,
                        "logprobs": logprobs, "finish_reason": out.finish})
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


async def _stream_chat(call: _Call, body: ChatCompletionRequest, state: ServerState):
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
    async for _, event in _stream_events(call):
        if isinstance(event, TokenEvent):
            if not (event.text or event.token is not None or event.finish_reason):
                continue
            tokens = [event.token] if event.token is not None else []
            logprobs = None
            if body.logprobs:
                logprobs = _chat_logprobs(state.tokenizer, tokens, [event.logprob] if tokens else [],
                                          [event.top_logprobs or []] if tokens else [])
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
        return _error_response(400, str(err))

    @app.exception_handler(PyBitNetError)
    async def engine_error(request: Request, err: PyBitNetError):
        return _error_response(500, str(err), kind="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error_response(err.status_code, str(err.detail), kind=kind, headers=getattr(err, "headers", None))


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
