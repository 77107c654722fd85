"""The server's prefix cache: a request whose prompt begins with tokens the server has already run reuses
their K/V, reports them as usage.prompt_tokens_details.cached_tokens, and gets the tokens and logprobs of a
server that computes everything (float32, native path, bit for bit); blocks are evicted within the budget;
the cache survives a restart through --prefix-cache-dir and refuses files of another model."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest
import torch

import pybitnet
from pybitnet import load_tokenizer, native
from pybitnet.serve.prefix_cache import FILE_NAME, PrefixCache
from test_serve_support import LiveServer, metric
from test_tokenizer_helpers import write_tiny_checkpoint

BLOCK = 16
NEW_TOKENS = 10
needs_native = pytest.mark.skipif(native.ops() is None, reason="bits are promised on the native float32 path")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("prefix"), max_position_embeddings=512)


@pytest.fixture(scope="module")
def model(checkpoint):
    return pybitnet.load(checkpoint)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _complete(url: str, prompt: list[int], **params) -> dict:
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "logprobs": 2, "temperature": 0, **params}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    return {"tokens": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"],
            "top": choice["logprobs"]["top_logprobs"], "cached": data["usage"]["prompt_tokens_details"]["cached_tokens"]}


def _same(a: dict, b: dict, what: str) -> None:
    assert a["tokens"] and a["tokens"] == b["tokens"], f"{what}: tokens differ"
    assert a["logprobs"] == b["logprobs"], f"{what}: logprobs differ"
    assert a["top"] == b["top"], f"{what}: top logprobs differ"


def _expected_cached(prompt_len: int, held: int) -> int:
    """What the server reuses of a prompt that repeats `held` positions it ran: the whole blocks it kept of them,
    leaving at least the prompt's last token to run."""
    return min(prompt_len - 1, held // BLOCK * BLOCK)


@needs_native
def test_reuse_gives_the_bits_of_a_full_prefill(model):
    vocab = model.config.vocab_size
    document = _ids(150, vocab, 1)
    question = [_ids(9 + 7 * i, vocab, 10 + i) for i in range(3)]
    params = [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 5}]
    with LiveServer(model, None, max_batch=4, context=400, prefix_cache_mb=0) as plain:
        reference = [[_complete(plain.url, document + q, **p) for q in question] for p in params]
        assert all(r["cached"] == 0 for rows in reference for r in rows)
    with LiveServer(model, None, max_batch=4, context=400, prefill_chunk=32) as server:
        for p, rows in zip(params, reference):
            for i, q in enumerate(question):
                got = _complete(server.url, document + q, **p)
                _same(got, rows[i], f"{p} question {i}")
                if p or i:  # everything after the very first request finds the document cached
                    assert got["cached"] >= 150 // BLOCK * BLOCK
        # a chat turn: the prompt repeats the previous prompt and its answer, then goes on
        first = _complete(server.url, document + question[0])
        turn = document + question[0] + first["tokens"] + _ids(12, vocab, 99)
        got = _complete(server.url, turn)
        held = len(document + question[0]) + len(first["tokens"]) - 1  # the last sampled token is never fed back
        assert got["cached"] == _expected_cached(len(turn), held)
        computed = metric(server.url, "pybitnet_prompt_tokens_computed_total")
        cached = metric(server.url, "pybitnet_prompt_tokens_cached_total")
        assert cached >= got["cached"] and metric(server.url, "pybitnet_prefix_cache_bytes") > 0
    with LiveServer(model, None, max_batch=4, context=400, prefix_cache_mb=0) as plain:
        _same(got, _complete(plain.url, turn), "chat turn")
    assert computed + cached == sum(len(document + q) for q in question) * 2 + len(document + question[0]) + len(turn)


@needs_native
def test_concurrent_requests_share_a_prefix_computed_once(model):
    vocab = model.config.vocab_size
    prefix = _ids(200, vocab, 2)
    prompts = [prefix + _ids(5 + i, vocab, 50 + i) for i in range(6)]
    with LiveServer(model, None, max_batch=8, context=400, prefix_cache_mb=0) as plain:
        reference = [_complete(plain.url, p) for p in prompts]
    with LiveServer(model, None, max_batch=8, context=400, prefill_chunk=64) as server:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: _complete(server.url, p), prompts))
        for i, (got, want) in enumerate(zip(results, reference)):
            _same(got, want, f"prompt {i}")
        # one request prefilled the prefix; every other found it cached: its 12 whole blocks, and the first 8
        # tokens of the block where the first request's tail began once that request has finished and kept it
        cached = sorted(r["cached"] for r in results)
        assert cached[0] == 0 and all(c in (192, 200) for c in cached[1:]), cached
        total = sum(len(p) for p in prompts)
        assert metric(server.url, "pybitnet_prompt_tokens_computed_total") == total - sum(cached)


@needs_native
def test_a_tiny_budget_evicts_and_stays_exact(model):
    vocab = model.config.vocab_size
    config = model.config
    block_bytes = 2 * config.num_layers * config.num_kv_heads * BLOCK * config.head_dim * 4
    prompts = [_ids(300, vocab, 70 + i) for i in range(6)]  # 18 blocks each
    with LiveServer(model, None, max_batch=2, context=400, prefix_cache_mb=0) as plain:
        reference = [_complete(plain.url, p) for p in prompts]
    with LiveServer(model, None, max_batch=2, context=400, prefix_cache_mb=1) as server:
        capacity = (1 << 20) // block_bytes
        assert capacity < 6 * 18  # the prompts do not all fit
        for i, p in enumerate(prompts + prompts[::-1]):
            _same(_complete(server.url, p), reference[i if i < 6 else 11 - i], f"request {i}")
        assert metric(server.url, "pybitnet_prefix_cache_evictions_total") > 0
        assert metric(server.url, "pybitnet_prefix_cache_bytes") <= capacity * block_bytes
        assert server.state.engine.prefix_cache.blocks <= capacity


def test_eviction_drops_least_recent_leaves_first():
    cache = PrefixCache(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, budget_bytes=3 * 2 * 4 * 2 * 4,
                        block_size=4)  # three blocks of 4 positions
    assert cache.capacity == 3
    kv = pybitnet.KVCache(1, 1, 16, 1, 2)
    kv.keys.copy_(torch.arange(32.0).view_as(kv.keys))
    a, b = list(range(12)), [99] + list(range(1, 8))
    assert cache.store(a, kv, 0, 12) == 3
    assert [blk.tokens for blk in cache.match(a).chain] == [tuple(a[:4]), tuple(a[4:8]), tuple(a[8:])]
    assert cache.store(b, kv, 0, 8) == 2  # needs two slots: a's two deepest blocks go, never a's root first
    assert cache.evictions == 2
    assert len(cache.match(a).chain) == 1 and len(cache.match(b).chain) == 2
    target = pybitnet.KVCache(1, 1, 16, 1, 2)
    assert cache.load(cache.match(b), target, 0) == 8
    assert torch.equal(target.keys[0, 0, :, :8], kv.keys[0, 0, :, :8]) and int(target.lengths[0]) == 8
    assert cache.match([1, 2, 3]).tokens == 0  # nothing cached starts with these


def test_a_prompt_reuses_the_shared_start_of_a_block_too():
    """K/V of a position depend only on the tokens up to it: a prompt that leaves a cached block after its k-th
    token reuses those k positions (and a limit inside a block stops there)."""
    cache = PrefixCache(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32, budget_bytes=1 << 20,
                        block_size=4)
    kv = pybitnet.KVCache(2, 1, 16, 1, 2)
    kv.keys.copy_(torch.randn(kv.keys.shape))
    kv.values.copy_(torch.randn(kv.values.shape))
    stored = list(range(10, 22))  # three blocks
    cache.store(stored, kv, 0, 12)
    prompt = stored[:6] + [99, 98, 97]  # leaves the second block after its second token
    found = cache.match(prompt)
    assert (len(found.chain), found.tail_tokens, found.tokens) == (1, 2, 6)
    target = pybitnet.KVCache(2, 1, 16, 1, 2)
    assert cache.load(found, target, 0) == 6 and int(target.lengths[0]) == 6
    assert torch.equal(target.keys[:, 0, :, :6], kv.keys[:, 0, :, :6])
    assert torch.equal(target.values[:, 0, :, :6], kv.values[:, 0, :, :6])
    assert not target.keys[:, 0, :, 6:].any()
    assert cache.match(stored, limit=7).tokens == 7  # the whole prompt cached: still stops at the limit
    assert cache.match([10, 11, 50]).tokens == 2  # inside the first block


@needs_native
def test_saved_cache_is_loaded_by_the_next_server(model, checkpoint, tmp_path, caplog):
    vocab = model.config.vocab_size
    prompt = _ids(120, vocab, 3)
    directory = tmp_path / "kv"
    with LiveServer(model, None, max_batch=2, context=400, prefix_cache_dir=str(directory)) as server:
        first = _complete(server.url, prompt)
        assert first["cached"] == 0
    saved = directory / FILE_NAME
    assert saved.is_file() and not [p for p in directory.iterdir() if p.name != FILE_NAME]  # no temporary left
    with LiveServer(model, None, max_batch=2, context=400, prefix_cache_dir=str(directory)) as server:
        again = _complete(server.url, prompt)
    _same(again, first, "after a restart")
    assert again["cached"] == 119  # all but the last prompt token: the first request ran the prompt and more

    other = pybitnet.load(write_tiny_checkpoint(tmp_path / "other", seed=7, max_position_embeddings=512))
    with LiveServer(other, None, max_batch=2, context=400, prefix_cache_dir=str(directory)) as server:
        assert _complete(server.url, prompt)["cached"] == 0  # another model's K/V are never used
    assert "another model" in caplog.text

    for damage in (lambda b: b[: len(b) // 2], lambda b: b"\x00garbage" * 100, lambda b: b""):
        with LiveServer(model, None, max_batch=2, context=400, prefix_cache_dir=str(directory)) as server:
            _complete(server.url, prompt)  # leaves a good file behind at shutdown
        saved.write_bytes(damage(saved.read_bytes()))
        with LiveServer(model, None, max_batch=2, context=400, prefix_cache_dir=str(directory)) as server:
            assert httpx.get(f"{server.url}/health").status_code == 200
            assert _complete(server.url, prompt)["cached"] == 0
    assert "prefix cache" in caplog.text and "not loaded" in caplog.text


def test_chat_usage_reports_cached_tokens_streaming_too(checkpoint, model):
    tokenizer = load_tokenizer(checkpoint)
    system = {"role": "system", "content": "You answer questions about the following text. " * 3}
    messages = [system, {"role": "user", "content": "What is it about?"}]
    with LiveServer(model, tokenizer, max_batch=2, context=400) as server:
        body = {"messages": messages, "max_tokens": 6, "temperature": 0}
        first = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        messages += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        body = {**body, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        import json

        usage = json.loads(lines[-1][6:])["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] // BLOCK * BLOCK - BLOCK
        assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_serve_refuses_prefix_cache_options_that_cannot_work(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # as `pybitnet serve` sets for itself, so it does not restart
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, message in ((["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be >= 0"),
                          (["--no-prefix-cache", "--prefix-cache-dir", str(tmp_path)], "--prefix-cache-dir needs"),
                          (["--prefix-cache-dir", str(a_file)], "is not a directory")):
        result = cli("serve", "synthetic:tiny", "--port", "1", *args)
        assert result.code != 0 and message in result.err, (args, result.err)
        assert len(result.err.strip().splitlines()) == 1


def test_a_served_process_saves_its_cache_on_sigterm_even_when_forced(checkpoint, tmp_path):
    """`pybitnet serve --prefix-cache-dir`: the file is written at a graceful stop and at a forced one (the drain
    times out while a request still runs), and the next process starts with it."""
    import signal

    from test_serve_support import ServerProcess

    prompt = _ids(80, 400, 11)
    for forced in (False, True):
        directory = tmp_path / f"kv-{forced}"
        args = ("--prefix-cache-dir", str(directory), "--threads", "1", "--drain-timeout", "0.2")
        with ServerProcess(str(checkpoint), *args) as server:
            assert _complete(server.url, prompt)["cached"] == 0
            if forced:  # sixteen long choices keep the drain waiting past its timeout
                concurrent.futures.ThreadPoolExecutor(1).submit(
                    httpx.post, f"{server.url}/v1/completions",
                    json={"prompt": prompt, "max_tokens": 400, "n": 16, "ignore_eos": True}, timeout=60)
                time.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=60)
            log = server.stop()
        assert ("drain timeout" in log) == forced, log[-2000:]
        assert (directory / FILE_NAME).is_file(), (forced, log[-2000:])
        with ServerProcess(str(checkpoint), *args) as server:
            assert _complete(server.url, prompt)["cached"] == 79
