"""Prefill once: a KV cache that remembers which tokens it holds, and a chat conversation built on one.

    Session(model, tokenizer)        generate(prompt, session=s) or s.generate(...): each prompt prefills only
                                     what follows the longest prefix the session already holds
    s.snapshot() / s.restore(snap)   keep the K/V of a prefix (a document, a system prompt) and go back to it,
                                     so one document serves many questions
    Conversation(model, tokenizer)   append messages, generate replies; each turn prefills the new message and
                                     the template's framing, not the history

A session's cache is one row of `max_len` positions (the model's context by default), allocated once. On the
native float32 CPU path the result of a prompt does not depend on what the session held before: attention and
the projections give every position the same bits however the sequence was split into calls
(docs/exactness.md), so reuse changes time, never tokens or logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import InputError
from .generate import GenerationResult, generate


@dataclass(frozen=True)
class Snapshot:
    """The tokens a session held and their K/V (copies): restore() returns the session to them."""

    tokens: tuple[int, ...]
    keys: torch.Tensor  # (layers, Hkv, len(tokens), D)
    values: torch.Tensor  # (layers, Hkv, len(tokens), D)
    model: str  # Transformer.fingerprint() of the model that made them


class Session:
    def __init__(self, model, tokenizer=None, *, max_len: int | None = None):
        context = int(model.config.max_position_embeddings)
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len):
            raise InputError(f"max_len must be an integer >= 2, got {max_len!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_len = min(max_len or context, context)
        self.cache = model.new_cache(1, self.max_len)  # (layers, 1, Hkv, max_len, D), written in place
        self.tokens: list[int] = []  # the ids whose K/V fill positions [0, len(tokens)) of the cache
        self.reused = 0  # prompt tokens the last prefill took from the cache
        self.computed = 0  # prompt tokens the last prefill ran through the model

    def __len__(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []
        self.cache.lengths.zero_()

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Make the session hold `ids`: keep the longest common prefix of what it holds, run the rest (at least
        the last token, whose logits are returned, (1, V))."""
        ids = [int(t) for t in ids]
        if not ids:
            raise InputError("a session prefills at least one token")
        if len(ids) > self.max_len:
            raise InputError(f"{len(ids)} tokens do not fit the session's {self.max_len} positions")
        common = common_prefix(self.tokens, ids)
        common = min(common, len(ids) - 1)
        self.cache.lengths[0] = common
        self.tokens = self.tokens[:common]
        with torch.inference_mode():
            tokens = torch.tensor([ids[common:]], dtype=torch.long, device=self.model.device)  # (1, T)
            logits = self.model.prefill(tokens, self.cache)  # (1, V)
        self.tokens = ids
        self.reused, self.computed = common, len(ids) - common
        return logits

    def generate(self, prompt: str | Sequence[int], **options) -> GenerationResult:
        """generate(model, tokenizer, prompt, session=self, **options): the prompt reuses what the session holds."""
        return generate(self.model, self.tokenizer, prompt, session=self, **options)

    def snapshot(self) -> Snapshot:
        n = len(self.tokens)
        return Snapshot(tuple(self.tokens), self.cache.keys[:, 0, :, :n].clone(), self.cache.values[:, 0, :, :n].clone(),
                        self.model.fingerprint())

    def restore(self, snapshot: Snapshot) -> None:
        n = len(snapshot.tokens)
        if snapshot.model != self.model.fingerprint():
            raise InputError("this snapshot was taken with another model (or dtype, or kernel path)")
        if n > self.max_len:
            raise InputError(f"this snapshot holds {n} tokens, more than the session's {self.max_len} positions")
        self.cache.keys[:, 0, :, :n] = snapshot.keys
        self.cache.values[:, 0, :, :n] = snapshot.values
        self.cache.lengths[0] = n
        self.tokens = list(snapshot.tokens)


class Conversation:
    """A chat whose turns reuse the K/V of the conversation so far.

    append(role, content) adds a message; generate(**options) renders the conversation with the tokenizer's chat
    template and prefills what the session does not hold yet: the new messages and the template's framing.
    The conversation's tokens are kept as the model saw them: a reply is held as the ids it was generated as (a
    reply's text may tokenize otherwise, which would make the next turn prefill it again), and only the text
    the template adds after it is encoded. When that is not possible (a template that does not render a
    conversation as the start of its continuation, a reply cut by a stop string) the whole conversation is
    encoded again and the session keeps what still matches.

    When the conversation no longer fits with room for the reply, the oldest messages after the system prompt
    are dropped until it fits in half the session, so the cache is rebuilt once and the turns after that reuse
    it again.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, max_len: int | None = None):
        if tokenizer is None:
            raise InputError("a conversation needs a tokenizer with a chat template")
        self.session = Session(model, tokenizer, max_len=max_len)
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.keep = len(self.messages)  # messages never dropped
        self.dropped = 0  # messages dropped so far to fit the context
        self._text: str | None = None  # the rendered conversation up to its last reply ...
        self._ids: list[int] = []  # ... and its ids as the model saw them

    def append(self, role: str, content: str) -> None:
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise InputError(f"a message needs a role (system, user, assistant, tool) and text content, got {role!r}")
        self.messages.append({"role": role, "content": content})

    def prompt_ids(self, room: int) -> list[int]:
        """The ids of the conversation with the generation prompt, dropping the oldest messages if they do not
        leave `room` positions; an InputError if the last message alone is too long."""
        limit = self.session.max_len
        ids = self._encode()
        if len(ids) + room <= limit:
            return ids
        while len(self.messages) > self.keep + 1:  # drop down to half the context: then many turns fit again
            del self.messages[self.keep]
            self.dropped += 1
            ids = self._encode()
            if len(ids) + room <= limit and len(ids) <= limit // 2:
                return ids
        if len(ids) < limit:
            return ids
        raise InputError(f"the last message is {len(ids)} tokens with the template, more than the context of {limit}")

    def generate(self, *, max_new_tokens: int = 256, **options) -> GenerationResult:
        if not self.messages or self.messages[-1]["role"] == "assistant":
            raise InputError("append a user (or tool) message before generating a reply")
        ids = self.prompt_ids(min(max_new_tokens, self.session.max_len // 2))
        prompt_text = self.tokenizer.apply_chat_template(self.messages)
        result = self.session.generate(ids, max_new_tokens=max_new_tokens, add_special_tokens=False, **options)
        reply, generated = result.texts[0], result.token_ids[0]
        self.messages.append({"role": "assistant", "content": reply})
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=False)
        self._text = None
        if text.startswith(prompt_text + reply) and self.tokenizer.decode(generated, skip_special_tokens=False) == reply:
            self._text = text
            self._ids = ids + generated + self._encode_piece(text[len(prompt_text) + len(reply):])
        return result

    def say(self, content: str, **options) -> str:
        """append("user", content), then generate(**options); the reply's text."""
        self.append("user", content)
        return self.generate(**options).texts[0]

    def _encode(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages)
        if self._text is not None and text.startswith(self._text):
            return self._ids + self._encode_piece(text[len(self._text):])
        return self.tokenizer.encode(text, add_special_tokens=False)  # the rendered text carries BOS already

    def _encode_piece(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
