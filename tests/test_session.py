"""pybitnet.Session and Conversation: prompts continue from the K/V a session holds, snapshots bring a shared
document back, and chat turns prefill only what is new, with the tokens of a fresh generate() every time
(float32, native path, bit for bit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pybitnet
from pybitnet import Conversation, Session, load_tokenizer, native
from pybitnet.errors import InputError
from pybitnet.generate import generate
from pybitnet.sampling import SamplingParams
from test_tokenizer_helpers import write_tiny_checkpoint

needs_native = pytest.mark.skipif(native.ops() is None, reason="bits are promised on the native float32 path")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("session"), max_position_embeddings=512)


@pytest.fixture(scope="module")
def model(checkpoint):
    return pybitnet.load(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@needs_native
def test_prompts_sharing_a_prefix_give_fresh_results(model, one_thread):
    vocab = model.config.vocab_size
    document = _ids(90, vocab, 1)
    session = Session(model)
    sampled = SamplingParams(temperature=0.8, top_k=40)
    for i, extra in enumerate([_ids(7, vocab, 2), _ids(12, vocab, 3), [], _ids(3, vocab, 4)]):
        prompt = document + extra
        for options in ({}, {"sampling": sampled, "seed": 9}):
            got = session.generate(prompt, max_new_tokens=8, **options)
            want = generate(model, None, [prompt], max_new_tokens=8, **options)
            assert got.token_ids == want.token_ids, (i, options)
            if i or options:
                assert session.reused >= len(document) - 1 and session.computed <= len(extra) + 1
        held = session.tokens
        assert held[: len(prompt)] == prompt and len(held) == int(session.cache.lengths[0])
    fresh = model.new_cache(1, 200)
    expected = model.prefill(torch.tensor([document + [5, 6]]), fresh)
    assert torch.equal(session.prefill(document + [5, 6]), expected)  # logits too, not just the argmax


@needs_native
def test_snapshot_serves_one_document_to_many_questions(model, one_thread):
    vocab = model.config.vocab_size
    document = _ids(120, vocab, 5)
    session = Session(model, max_len=300)
    session.prefill(document)
    snap = session.snapshot()
    for k in range(3):
        question = _ids(6 + k, vocab, 20 + k)
        got = session.generate(document + question, max_new_tokens=6)
        assert session.reused == len(document)
        assert got.token_ids == generate(model, None, [document + question], max_new_tokens=6).token_ids
        session.prefill(_ids(40, vocab, 30 + k))  # something else entirely replaces the document
        session.restore(snap)
        assert session.tokens == document
    other = Session(pybitnet.synthetic.random_model("tiny", seed=1))
    with pytest.raises(InputError, match="another model"):
        other.restore(snap)


@needs_native
def test_conversation_turns_prefill_only_what_is_new(model, tokenizer, one_thread):
    chat = Conversation(model, tokenizer, system="You are terse.")
    for turn, text in enumerate(["Hello there.", "What did I say?", "Again, please.", "Thanks!"]):
        chat.append("user", text)
        rendered = tokenizer.apply_chat_template(chat.messages)
        result = chat.generate(max_new_tokens=12)
        prompt = result.prompt_ids[0]  # earlier replies as the ids they were generated as
        assert tokenizer.decode(prompt, skip_special_tokens=False) == rendered
        assert result.token_ids == generate(model, tokenizer, [prompt], max_new_tokens=12).token_ids
        if turn:
            assert chat.session.reused > 0 and chat.session.computed < len(prompt) // 2, turn
        assert chat.messages[-1] == {"role": "assistant", "content": result.texts[0]}
    with pytest.raises(InputError, match="append a user"):
        chat.generate()


@needs_native
def test_a_full_context_drops_old_turns_once_then_reuses_again(model, tokenizer, one_thread):
    chat = Conversation(model, tokenizer, max_len=160)
    rebuilt = []
    for turn in range(8):
        chat.append("user", f"Message number {turn} is here.")
        before = chat.dropped
        prompt_len = len(chat.prompt_ids(16))
        result = chat.generate(max_new_tokens=16)
        assert result.token_ids == generate(model, tokenizer, [result.prompt_ids[0]], max_new_tokens=16).token_ids
        if chat.dropped > before:
            rebuilt.append(turn)
            assert len(result.prompt_ids[0]) <= 80  # dropped down to half the context
        elif turn:
            assert chat.session.reused > 0, turn
        assert prompt_len + 16 <= 160
    assert rebuilt and len(rebuilt) < 4  # history was dropped, but not on every turn
    assert chat.messages[0]["role"] == "user"  # no system prompt here: the oldest messages went
