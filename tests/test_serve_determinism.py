"""Batch invariance through a live server: a request's tokens and logprobs do not depend on who else is
being served (float32, bit for bit), and temperature 0 agrees with pybitnet.generate."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest
import torch

import pybitnet
from pybitnet import load_tokenizer
from pybitnet.generate import generate
from test_serve_support import LiveServer, ServerProcess, metric
from test_tokenizer_helpers import write_tiny_checkpoint

CROWD = 16
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve-det"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def model(checkpoint):
    return pybitnet.load(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    lengths = [3 + 9 * i for i in range(CROWD)]  # 3 .. 138 tokens: a ragged crowd
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _complete(url: str, prompt: list[int], **params) -> dict:
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "logprobs": 2, **params}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {"tokens": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"],
            "top": choice["logprobs"]["top_logprobs"]}


def _alone_and_in_crowd(url: str, prompts: list[list[int]], **params) -> tuple[list[dict], list[dict]]:
    alone = [_complete(url, p, **params) for p in prompts]  # one at a time: each decodes with idle slots only
    with concurrent.futures.ThreadPoolExecutor(CROWD) as pool:
        crowd = list(pool.map(lambda p: _complete(url, p, **params), prompts))
    return alone, crowd


def test_alone_and_among_fifteen_others_are_bit_identical(checkpoint, model):
    """The server runs as `pybitnet serve` does, in a process of its own (MKL's mode is set at its start)."""
    prompts = _prompts(model.config.vocab_size)
    with ServerProcess(str(checkpoint), "--max-batch", str(CROWD), "--ctx", "200", "--threads", "2") as server:
        assert metric(server.url, "pybitnet_batch_invariant") == 1.0
        for params in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 50, "seed": 11}):
            alone, crowd = _alone_and_in_crowd(server.url, prompts, **params)
            for i, (a, c) in enumerate(zip(alone, crowd)):
                assert a["tokens"], f"{params} prompt {i}: nothing generated"
                assert a["tokens"] == c["tokens"], f"{params} prompt {i}: tokens differ alone vs in the crowd"
                assert a["logprobs"] == c["logprobs"], f"{params} prompt {i}: logprobs differ alone vs in the crowd"
                assert a["top"] == c["top"], f"{params} prompt {i}: top logprobs differ alone vs in the crowd"
        assert metric(server.url, "pybitnet_batch_size_bucket", 'le="8.0"') < metric(
            server.url, "pybitnet_batch_size_count")  # the crowd really decoded together


def test_greedy_text_equals_generate(model, tokenizer):
    prompts = ["The quick brown fox", "Hello world! How are you today?", "Numbers like 12345"]
    reference = generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS)
    with LiveServer(model, tokenizer, max_batch=4, context=200) as server:
        for i, prompt in enumerate(prompts):
            body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
            choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
            assert choice["token_ids"] == reference.token_ids[i]
            assert choice["text"] == reference.texts[i]
            expected = "length" if reference.finish_reasons[i] == "length" else "stop"
            assert choice["finish_reason"] == expected


def test_chunked_prefill_matches_generate_float64(checkpoint):
    """A prompt prefilled 7 tokens per scheduler iteration gives generate()'s tokens, and logprobs that
    meet the float64 rule against one full-sequence pass."""
    model64 = pybitnet.load(checkpoint, dtype=torch.float64)
    prompt = _prompts(model64.config.vocab_size)[5]  # 48 tokens
    reference = generate(model64, None, [prompt], max_new_tokens=NEW_TOKENS)
    with LiveServer(model64, None, max_batch=2, context=200, prefill_chunk=7) as server:
        result = _complete(server.url, prompt, temperature=0)
    assert result["tokens"] == reference.token_ids[0]
    with torch.no_grad():
        logits = model64.forward_full(torch.tensor([prompt + result["tokens"]]))[0]
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    got = torch.tensor(result["logprobs"], dtype=torch.float64)
    wanted = expected[torch.arange(len(result["tokens"])), torch.tensor(result["tokens"])]
    assert float((got - wanted).abs().max()) <= 1e-9 * float(expected.abs().max())
