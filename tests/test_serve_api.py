"""The server's HTTP API against a live server on a loopback port: the official `openai` client, raw bodies,
errors, cancellation, back-pressure and health."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import socket
import threading
import time
import types
from pathlib import Path

import httpx
import openai
import pytest
import torch

import pybitnet
from pybitnet import load_tokenizer
from test_serve_support import GatedTokenizer, LiveServer, SlowModel, metric
from test_tokenizer_helpers import write_tiny_checkpoint

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "what is the capital of France?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve-api"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def model(checkpoint):
    return pybitnet.load(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with LiveServer(model, tokenizer, max_batch=4, max_queue=8, context=256, model_name="tiny") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _stream_text(stream) -> tuple[str, list[str | None], object]:
    """Concatenated text, each chunk's finish_reason, and the usage chunk's usage of a completions stream."""
    text, finishes, usage = "", [], None
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or "" if hasattr(choice, "delta") else choice.text
        finishes.append(choice.finish_reason)
    return text, finishes, usage


def test_completion_logprobs_match_the_model(client, model, tokenizer):
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    choice = result.choices[0]
    prompt_ids = tokenizer.encode(PROMPT)
    generated = choice.model_extra["token_ids"]
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == len(generated) == len(choice.logprobs.token_logprobs)
    assert result.usage.total_tokens == len(prompt_ids) + len(generated)
    assert choice.text == tokenizer.decode(generated)
    # Independent expectation: one full-sequence pass over prompt + output, log-softmax at each position.
    with torch.no_grad():
        logits = model.forward_full(torch.tensor([prompt_ids + generated]))[0].double()
    expected = torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1]
    for step, token in enumerate(generated):
        assert choice.logprobs.token_logprobs[step] == pytest.approx(float(expected[step, token]), abs=1e-4)
        assert token == int(expected[step].argmax())  # greedy
        top = choice.logprobs.top_logprobs[step]
        assert 1 <= len(top) <= 3 and max(top.values())  # alternatives that decode alike share a key == pytest.approx(choice.logprobs.token_logprobs[step])


def test_streamed_text_equals_non_streamed_for_the_same_seed(client):
    params = dict(model="tiny", max_tokens=16, temperature=0.9, top_p=0.95, seed=5)
    whole = client.completions.create(prompt=PROMPT, **params)
    text, finishes, usage = _stream_text(client.completions.create(
        prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **params))
    assert text == whole.choices[0].text
    assert finishes[-1] == whole.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert usage.completion_tokens == whole.usage.completion_tokens
    chat = client.chat.completions.create(messages=MESSAGES, **params)
    text, finishes, usage = _stream_text(client.chat.completions.create(
        messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **params))
    assert text == chat.choices[0].message.content
    assert finishes[-1] == chat.choices[0].finish_reason
    assert usage.total_tokens == chat.usage.total_tokens


def test_chat_n_choices_logprobs_and_usage(client, tokenizer):
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, n=2, temperature=1.0,
                                            seed=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in result.choices] == [0, 1]
    prompt_tokens = len(tokenizer.encode_chat(MESSAGES))
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in result.choices)
    assert result.choices[0].model_extra["token_ids"] != result.choices[1].model_extra["token_ids"]
    for choice in result.choices:
        entries = choice.logprobs.content
        assert [e.token for e in entries] == [tokenizer.decode([t], skip_special_tokens=False)
                                              for t in choice.model_extra["token_ids"]]
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_stop_string_cuts_the_text(client):
    free = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert len(free) > 6
    stop = free[3:6]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@"])
    assert cut.choices[0].text == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed, finishes, _ = _stream_text(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                                                    temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text and finishes[-1] == "stop"


def test_echo_token_prompts_and_lists_of_prompts(client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    echoed = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, echo=True,
                                       logprobs=1)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert echoed.choices[0].text == tokenizer.decode(ids) + plain.choices[0].text
    logprobs = echoed.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + 4 and logprobs.token_logprobs[0] is None
    two = client.completions.create(model="tiny", prompt=[PROMPT, "Hello world"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text == plain.choices[0].text  # greedy: both choices alike


def test_models_tokenize_detokenize_health(server, tokenizer):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 256
    tokens = httpx.post(f"{server.url}/tokenize", json={"content": PROMPT}).json()["tokens"]
    assert tokens == tokenizer.encode(PROMPT)
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["content"] == PROMPT
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "n": 99}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": [5] * 300}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "seed": -1}, "seed"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.role"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["@"] * 17}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": "@" * 257}, "stop"),
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),  # a lone surrogate: valid JSON, not Unicode text
    ("/v1/completions", {"prompt": [PROMPT, "\udfff"]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages"),
    ("/tokenize", {"content": "\ud800"}, "content"),
    ("/v1/completions", {"prompt": "ab " * 3000}, "prompt"),  # more characters than 256 tokens can hold
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab " * 3000}]}, "messages"),
    ("/tokenize", {"content": "ab " * 3000}, "content"),
])
def test_bad_bodies_are_400_naming_the_field(server, path, body, param):
    # json.dumps escapes a lone surrogate as \\ud800, as a client's JSON encoder would
    response = httpx.post(f"{server.url}{path}", content=json.dumps(body),
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'{"prompt": NaN}'])
def test_malformed_json_is_400(server, content):
    response = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in ("body", "prompt")


def test_unknown_parameters_are_ignored(client):
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                       extra_body={"mirostat": 2, "best_of_unknown": True})
    assert result.choices[0].finish_reason in ("length", "stop")


def test_disconnect_mid_stream_frees_the_slot(server):
    cancelled = metric(server.url, "pybitnet_requests_finished_total", 'outcome="cancelled"') \
        if "cancelled" in httpx.get(f"{server.url}/metrics").text else 0.0
    body = {"prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(server.url, "pybitnet_requests_running") == 1.0
    deadline = time.monotonic() + 10
    while metric(server.url, "pybitnet_requests_running") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server.url, "pybitnet_requests_running") == 0.0
    assert metric(server.url, "pybitnet_requests_finished_total", 'outcome="cancelled"') == cancelled + 1


def test_queue_full_is_503_with_retry_after(model, tokenizer):
    with LiveServer(model, tokenizer, max_batch=1, max_queue=1, context=256) as live:
        body = {"prompt": PROMPT, "max_tokens": 240, "ignore_eos": True}  # one runs, one waits, the rest bounce
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{live.url}/v1/completions", json=body, timeout=60),
                                      range(6)))
    refused = [r for r in responses if r.status_code == 503]
    answered = [r for r in responses if r.status_code == 200]
    assert refused and len(answered) >= 2 and len(refused) + len(answered) == 6
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert all(r.json()["error"]["type"] == "server_overloaded" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 240 for r in answered)


def test_api_key_is_required_when_set(model, tokenizer):
    with LiveServer(model, tokenizer, max_batch=1, context=256, api_key="sekrit") as live:
        assert httpx.get(f"{live.url}/v1/models").status_code == 401
        wrong = httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sekrit", max_retries=0)
        assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(f"{live.url}/health").status_code == 200  # health and metrics stay open


def test_health_is_503_while_the_model_loads(model, tokenizer):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return model, tokenizer

    from pybitnet.serve import ServerSettings, create_app
    import uvicorn
    import socket

    app = create_app(slow_load, ServerSettings(max_batch=1, context=64))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert response.status_code == 503 and response.json() == {"status": "loading"}
        early = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT})
        assert early.status_code == 503 and "loading" in early.json()["error"]["message"]
        loaded.set()
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_sse_wire_format(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_a_tokenizer_without_a_template_chats_in_chatml(model):
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    from pybitnet.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    backend.train_from_iterator(["user assistant hello there", "what is the capital of France?"] * 5, trainer)
    tokenizer = Tokenizer(backend, bos_token=None, eos_token=None)
    expected = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    with LiveServer(model, tokenizer, max_batch=1, context=256) as live:
        body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
        usage = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=30).json()["usage"]
        assert live.state.chat_stops == ([tokenizer.token_to_id("<|im_end|>")], [])
    assert usage["prompt_tokens"] == len(tokenizer.encode(expected, add_special_tokens=False))


def test_a_body_over_the_size_limit_is_413_before_it_is_read(model, tokenizer):
    body = json.dumps({"prompt": "ab " * 30_000, "max_tokens": 2}).encode()  # 90 kB
    with LiveServer(model, tokenizer, max_batch=1, context=256, max_request_bytes=64_000) as live:
        declared = httpx.post(f"{live.url}/v1/completions", content=body,
                              headers={"content-type": "application/json"}, timeout=30)

        def chunks():  # no Content-Length: the server counts what arrives
            for start in range(0, len(body), 8192):
                yield body[start:start + 8192]

        chunked = httpx.post(f"{live.url}/v1/completions", content=chunks(),
                             headers={"content-type": "application/json"}, timeout=30)
        small = httpx.post(f"{live.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "body"
        assert "64000" in error["message"]
    assert small.status_code == 200, small.text


def test_health_answers_while_a_prompt_is_tokenized(model, tokenizer):
    gated = GatedTokenizer(tokenizer)
    with LiveServer(model, gated, max_batch=1, context=256) as live:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{live.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                                  timeout=30)
            try:
                assert gated.entered.wait(10), "the prompt was never tokenized"
                assert httpx.get(f"{live.url}/health", timeout=2).json() == {"status": "ok"}
            finally:
                gated.gate.set()
            assert pending.result(timeout=30).status_code == 200


def test_a_non_streaming_client_that_hangs_up_frees_its_rows_at_once(model, tokenizer):
    # Events arrive every decode step, so the server must not wait for a quiet moment to notice the client left.
    with LiveServer(SlowModel(model, 0.01), tokenizer, max_batch=4, context=256) as live:
        request = json.dumps({"prompt": PROMPT, "max_tokens": 240, "n": 4, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(request), request))
            deadline = time.monotonic() + 20
            while metric(live.url, "pybitnet_requests_running") != 4.0:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while metric(live.url, "pybitnet_requests_running") != 0.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric(live.url, "pybitnet_requests_running") == 0.0
        assert metric(live.url, "pybitnet_requests_finished_total", 'outcome="cancelled"') == 1.0
        assert metric(live.url, "pybitnet_generation_tokens_total") < 4 * 240 / 2


def test_docs_pages_are_off_unless_asked_for(server, model, tokenizer):
    assert httpx.get(f"{server.url}/docs").status_code == 404
    assert httpx.get(f"{server.url}/redoc").status_code == 404
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200
    with LiveServer(model, tokenizer, max_batch=1, context=64, docs=True) as live:
        assert httpx.get(f"{live.url}/docs").status_code == 200


def test_a_broken_chat_template_is_a_500_that_names_no_local_path(model, tokenizer, checkpoint):
    broken = copy.copy(tokenizer)
    broken.chat_template = "{% for message in messages %}{{ message['content'] | nosuchfilter }}{% endfor %}"
    refusing = copy.copy(tokenizer)
    refusing.chat_template = "{{ raise_exception('roles must alternate') }}"
    for chat_tokenizer, status in ((broken, 500), (refusing, 400)):
        with LiveServer(model, chat_tokenizer, max_batch=1, context=256) as live:
            response = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert "chat template" in error["message"] and str(checkpoint) not in response.text
        assert error["type"] == ("server_error" if status == 500 else "invalid_request_error")


def test_the_default_context_is_capped_at_what_fits_in_memory(model, tokenizer, monkeypatch, caplog):
    import pybitnet.serve.app as serve_app

    c = model.config
    per_position = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * (1 + 2)  # max_batch 1, float32
    available = per_position * 120  # its share holds fewer positions than the model's 256
    fits = int(available * serve_app.CACHE_MEMORY_SHARE // per_position)
    assert 2 < fits < 256
    monkeypatch.setattr(serve_app.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))
    with caplog.at_level(logging.WARNING, logger="pybitnet.serve"):
        with LiveServer(model, tokenizer, max_batch=1) as live:
            card = httpx.get(f"{live.url}/v1/models").json()["data"][0]
    assert card["max_model_len"] == fits
    assert any(f"context capped at {fits}" in r.getMessage() for r in caplog.records)


def test_text_too_long_for_the_context_is_refused_before_it_is_tokenized(model, tokenizer):
    gated = GatedTokenizer(tokenizer)
    gated.gate.set()
    with LiveServer(model, gated, max_batch=1, context=256) as live:
        for path, body in (("/v1/completions", {"prompt": "ab " * 3000}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab " * 3000}]})):
            response = httpx.post(f"{live.url}{path}", json=body, timeout=30)
            assert response.status_code == 400 and "characters" in response.json()["error"]["message"]
    assert not gated.entered.is_set()
