"""Text <-> token ids: a thin wrapper over HF `tokenizers`.

This module turns text into ids and back over what it is handed; it knows nothing of MODEL specs, loaders
or GGUF files (`pybitnet.load_tokenizer` finds a spec's tokenizer and builds it with the constructors here).
Two sources give the same `Tokenizer`:
- an HF directory (`tokenizer.json` + `tokenizer_config.json`, optional `generation_config.json`);
- GGUF metadata (`tokenizer.ggml.*`, docs/formats.md): `gpt2` byte-level BPE (LLaMA-3 vocab, tokens + merges,
  LLaMA-3 split regex) or `llama` SentencePiece-style BPE with byte fallback (1bitLLM family, tokens + scores).

Also here: the 2B-4T chat format (docs/formats.md) and an incremental decoder for streaming, because both are
about turning ids into text and nothing else.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from .errors import CheckpointError, InputError, PyBitNetError

# LLaMA-3 pre-tokenizer split (tokenizer.json of every LLaMA-3 vocab; llama.cpp "llama-bpe").
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF tokenizer.ggml.token_type values (llama.cpp llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"  # "▁": SentencePiece's visible space
# Arch names whose embedded GGUF chat template is known to be wrong (ik_llama.cpp #339): use the built-in format.
_BITNET_GGUF_ARCHS = ("bitnet-b1.58", "bitnet-25")


class Tokenizer:
    """Encode/decode text, know the special tokens, format chats. Wraps a `tokenizers.Tokenizer`."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        stop_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self.backend = backend
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._id_or_none(bos_token)
        self.eos_token_id = self._id_or_none(eos_token)
        # End-of-turn marker of the chat format: LLaMA-3's <|eot_id|> when the vocab has it, else EOS.
        self.eot_token = "<|eot_id|>" if backend.token_to_id("<|eot_id|>") is not None else eos_token
        self.eot_token_id = self._id_or_none(self.eot_token)
        stops = [t for t in (self.eos_token_id, self.eot_token_id) if t is not None]
        stops += [int(t) for t in stop_token_ids]
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))  # ordered, no duplicates
        self.chat_template = chat_template

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"stop={list(self.stop_token_ids)})"
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's own template (BOS for LLaMA-3)."""
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- chat ------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text for `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).
        `tools` (OpenAI tool objects) are handed to a jinja template as `tools`; the built-in format ignores them."""
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise InputError(f"chat message {i} must be a mapping with 'role' and 'content', got {message!r}")
        if self.chat_template is not None:
            return _render_jinja_template(self.chat_template, messages, add_generation_prompt, self, tools)
        return format_bitnet_chat(
            messages, bos_token=self.bos_token or "", eot_token=self.eot_token or "",
            add_generation_prompt=add_generation_prompt,
        )

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        # The rendered text already carries BOS; adding the template's BOS again would double it.
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.encode(text, add_special_tokens=False)

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(
                f"no tokenizer in {directory}: expected tokenizer.json (a model directory without one can only "
                "be used with token ids)"
            )
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"cannot read {tokenizer_file}: {err}") from err
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        extra_stops = generation.get("eos_token_id", [])
        extra_stops = [extra_stops] if isinstance(extra_stops, int) else extra_stops or []
        if not isinstance(extra_stops, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                        for t in extra_stops):
            raise CheckpointError(f"{directory / 'generation_config.json'}: eos_token_id must be an id or a list "
                                  f"of ids, got {extra_stops!r}")
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            stop_token_ids=extra_stops,
            chat_template=_pick_chat_template(config.get("chat_template")),
            source=str(directory),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, source: str = "<gguf metadata>") -> "Tokenizer":
        """Build from the `tokenizer.ggml.*` keys of a GGUF file (values as Python scalars / sequences).
        Metadata of the wrong types or lengths is a CheckpointError naming `source`."""
        try:
            return cls._from_gguf_metadata(metadata, source)
        except PyBitNetError:
            raise
        except Exception as err:  # TypeError/ValueError from our conversions, bare Exception from tokenizers
            raise CheckpointError(f"{source}: malformed tokenizer metadata ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''})") from None

    @classmethod
    def _from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str) -> "Tokenizer":
        kind = _as_str(metadata.get("tokenizer.ggml.model"))
        if kind is None or kind == "no_vocab":
            raise CheckpointError(f"{source} has no tokenizer (tokenizer.ggml.model is {kind!r})")
        tokens = [_as_str(t) for t in _required(metadata, "tokenizer.ggml.tokens", source)]
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
        if len(types) != len(tokens):
            raise CheckpointError(
                f"{source}: tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens {len(tokens)}"
            )

        def special(key: str) -> str | None:
            token_id = metadata.get(key)
            if token_id is None or not 0 <= int(token_id) < len(tokens):
                return None
            return tokens[int(token_id)]

        bos, eos = special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id")
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", bos is not None))
        if kind == "gpt2":
            merges = _required(metadata, "tokenizer.ggml.merges", source)
            backend = _byte_level_bpe(tokens, types, merges, _as_str(metadata.get("tokenizer.ggml.pre")), source)
        elif kind == "llama":
            scores = [float(s) for s in _required(metadata, "tokenizer.ggml.scores", source)]
            if len(scores) != len(tokens):
                raise CheckpointError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries, "
                                      f"tokenizer.ggml.tokens {len(tokens)}")
            unk = special("tokenizer.ggml.unknown_token_id")
            add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            backend = _sentencepiece_bpe(tokens, types, scores, unk, add_space_prefix)
        else:
            raise CheckpointError(f"{source}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)")
        _add_special_tokens(backend, tokens, types)
        if add_bos and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                special_tokens=[(bos, tokens.index(bos))],
            )
        stops = [int(metadata[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in metadata]
        if any(not 0 <= t < len(tokens) for t in stops):
            raise CheckpointError(f"{source}: stop token ids {stops} lie outside the vocabulary of {len(tokens)}")
        arch = _as_str(metadata.get("general.architecture"))
        template = _as_str(metadata.get("tokenizer.chat_template"))
        if arch in _BITNET_GGUF_ARCHS:
            template = None
        return cls(backend, bos_token=bos, eos_token=eos, stop_token_ids=stops, chat_template=template, source=source)


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` (stop ids) that
    `Tokenizer.from_hf_dir` and transformers read back as the same tokenizer."""
    directory = Path(directory)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                              "tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    generation = {"eos_token_id": list(tokenizer.stop_token_ids)}
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")


def gguf_tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.ggml.*` keys for a byte-level BPE tokenizer (LLaMA-3 / 2B-4T style), padded to the model's
    vocab_size as llama.cpp's converter pads.

    The pre-tokenizer name (`tokenizer.ggml.pre`) is left out, as in the official 2B-4T GGUF: llama.cpp
    identifies it by hashing tokenizer output, which needs the original tokenizer.
    """
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{tokenizer.source}: only byte-level BPE tokenizers convert to GGUF, "
                              f"got {model.get('type')!r}")
    tokens: list[str | None] = [None] * vocab_size
    types = [TOKEN_NORMAL] * vocab_size
    for token, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id] = token
    for added in spec.get("added_tokens") or []:
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    for token_id, token in enumerate(tokens):
        if token is None or token.startswith("<|unused_"):  # ids the tokenizer never produces
            tokens[token_id], types[token_id] = token or f"[PAD{token_id}]", TOKEN_UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    metadata: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                                "tokenizer.ggml.add_bos_token": bool(tokenizer.bos_token_id is not None and
                                                                     tokenizer.encode("a")[:1] == [tokenizer.bos_token_id])}
    ids = {"tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
           "tokenizer.ggml.eot_token_id": tokenizer.eot_token_id if tokenizer.eot_token_id != tokenizer.eos_token_id
           else None}
    metadata.update({key: value for key, value in ids.items() if value is not None and value < vocab_size})
    if tokenizer.chat_template is not None:
        metadata["tokenizer.chat_template"] = tokenizer.chat_template
    return metadata


def byte_level_alphabet() -> list[str]:
    """The printable character that byte-level BPE (GPT-2, LLaMA-3) writes for each byte 0..255, in byte order:
    printable Latin-1 bytes stand for themselves, the others for 256, 257, ... in turn."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


# -- chat format -------------------------------------------------------------------------------------------------


def format_bitnet_chat(
    messages: Sequence[Mapping[str, str]], *, bos_token: str, eot_token: str, add_generation_prompt: bool = True
) -> str:
    """2B-4T chat text (docs/formats.md): `<bos>User: hi<|eot_id|>Assistant: ` — roles capitalised, content trimmed."""
    parts = [bos_token]
    for message in messages:
        parts.append(f"{str(message['role']).capitalize()}: {str(message['content']).strip()}{eot_token}")
    if add_generation_prompt:
        parts.append("Assistant: ")
    return "".join(parts)


# Bounds on rendering a checkpoint's chat template, which is code from the checkpoint: wall time, characters
# of output beyond the conversation's own, and the size of any number, string or list it builds with * or **.
CHAT_TEMPLATE_SECONDS = 2.0
CHAT_TEMPLATE_MAX_CHARS = 1 << 20
CHAT_TEMPLATE_MAX_ITEMS = 1 << 20  # elements of a string or list made by *
CHAT_TEMPLATE_MAX_BITS = 1 << 16  # of an integer made by * or **


class _TemplateLimit(Exception):
    """A bound of the chat template sandbox was reached (never escapes this module)."""


def _sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        # Checked before Python builds the value, which could take minutes or all memory; jinja also stops
        # folding these operators at compile time once they are intercepted.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            _check_binop_size(operator, left, right)
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


def _check_binop_size(operator: str, left: Any, right: Any) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if operator == "**" and is_int(left) and is_int(right) and right > 0:
        bits = max(abs(left).bit_length() - 1, 0) * right  # log2 of the result, give or take one per factor
        if bits > CHAT_TEMPLATE_MAX_BITS:
            raise _TemplateLimit(f"{left} ** {right} is too large (about {bits} bits)")
    if operator == "*":
        if is_int(left) and is_int(right):
            if left.bit_length() + right.bit_length() > CHAT_TEMPLATE_MAX_BITS:
                raise _TemplateLimit("a product of two huge integers is too large")
            return
        sequence, count = (left, right) if is_int(right) else (right, left)
        if is_int(count) and hasattr(sequence, "__len__") and len(sequence) * max(count, 0) > CHAT_TEMPLATE_MAX_ITEMS:
            raise _TemplateLimit(f"a {type(sequence).__name__} of {len(sequence)} repeated {count} times is too large")


def _trace_with_deadline(seconds: float):
    """A sys.settrace hook that raises _TemplateLimit in template code (jinja compiles it as "<template>")
    once `seconds` have passed: loops of template code are checked line by line."""
    deadline = time.monotonic() + seconds

    def local(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TemplateLimit(f"rendering took longer than {seconds:g} s")
        return local

    def hook(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    return hook


def _render_jinja_template(template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool,
                           tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    # Same environment settings as transformers' apply_chat_template so checkpoints' templates render identically.
    try:
        sandbox = _sandbox()
    except ImportError as err:
        raise CheckpointError("this checkpoint's chat template needs the jinja2 package (pip install jinja2)") from err

    def raise_exception(message: str) -> None:
        raise InputError(f"chat template refused the conversation: {message}")

    env = sandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    max_chars = CHAT_TEMPLATE_MAX_CHARS + sum(len(str(m["content"])) for m in messages) + len(json.dumps(tools or []))
    pieces: list[str] = []
    size = 0
    previous_trace = sys.gettrace()
    sys.settrace(_trace_with_deadline(CHAT_TEMPLATE_SECONDS))
    try:
        compiled = env.from_string(template)
        for piece in compiled.generate(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
            **({"tools": [dict(t) for t in tools]} if tools is not None else {}),
        ):
            size += len(piece)
            if size > max_chars:
                raise _TemplateLimit(f"its output grew past {max_chars} characters")
            pieces.append(piece)
    except PyBitNetError:
        raise
    except _TemplateLimit as err:
        raise CheckpointError(f"chat template of {tokenizer.source} stopped: {err}") from None
    except Exception as err:  # MemoryError, RecursionError, OverflowError, TemplateError, ... from template code
        raise CheckpointError(
            f"chat template of {tokenizer.source} failed to render ({type(err).__name__}: {err})") from None
    finally:
        sys.settrace(previous_trace)
    return "".join(pieces)


# -- streaming ---------------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never emitting half a UTF-8 character.

    A byte-level token can end in the middle of a multi-byte character; decoding then yields U+FFFD, so the piece
    is held back until a later token completes it. The last few prompt tokens are kept as context because
    SentencePiece decoders strip the leading space of a sequence that starts at a word.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (), *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [int(i) for i in context_ids[-4:]]
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were already emitted (kept as decoding context)
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' while a character is still incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a character the generation never completed decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]


# -- GGUF builders -----------------------------------------------------------------------------------------------


def _byte_level_bpe(tokens: list[str], types: list[int], merges: Sequence[Any], pre: str | None,
                    source: str) -> HFTokenizer:
    vocab = _vocab_dict(tokens)
    pairs = []
    for merge in merges:
        left, sep, right = _as_str(merge).partition(" ")  # byte-level tokens never contain a real space
        if not sep:
            raise CheckpointError(f"{source}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    if pre in (None, "llama-bpe", "llama3", "llama-v3", "default"):
        # 2B-4T's GGUF has no tokenizer.ggml.pre; its vocab is LLaMA-3's, whose tokenizer.json sets ignore_merges.
        backend = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=True, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    elif pre == "gpt-2":
        backend = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise CheckpointError(f"{source}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: llama-bpe, gpt-2)")
    backend.decoder = decoders.ByteLevel()
    return backend


def sentencepiece_merges(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven BPE, which merges the adjacent pair whose joined
    piece has the highest score. Every split of a normal piece into two known pieces is a merge, ranked by the
    piece's score (ties: longer left part first, then lower ids), as transformers' SentencePiece converter does."""
    vocab = _vocab_dict(tokens)
    candidates = []
    for token_id, (piece, kind) in enumerate(zip(tokens, types)):
        if kind not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(piece) < 2:
            continue
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        candidates.extend((scores[token_id], len(left), len(right), (left, right)) for left, right in local)
    candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)  # stable: equal keys keep id order
    return [c[3] for c in candidates]


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float], unk: str | None,
                       add_space_prefix: bool) -> HFTokenizer:
    model = models.BPE(_vocab_dict(tokens), sentencepiece_merges(tokens, types, scores), unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    backend = HFTokenizer(model)
    # The "legacy" LLaMA-2 tokenizer.json: every text segment gets a leading ▁, as llama.cpp's SPM tokenizer does.
    steps = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPM_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()] + strip
    )
    return backend


def _add_special_tokens(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    # Control tokens (<|eot_id|>, <s>) must match as whole strings before pre-tokenization, like tokenizer.json's
    # added_tokens; they already sit in the vocab, so they keep their ids.
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                if k in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    if specials:
        backend.add_special_tokens(specials)
    if user:
        backend.add_tokens(user)


# -- small helpers -----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...} (AddedToken)."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    """A string, or a list of {"name", "template"} entries of which "default" is used."""
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, Mapping)}
        return named.get("default")
    return value if isinstance(value, str) else None


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a duplicated piece keeps its first id, as llama.cpp does
    return vocab


def _as_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _required(metadata: Mapping[str, Any], key: str, source: str) -> Sequence[Any]:
    if key not in metadata:
        raise CheckpointError(f"{source}: tokenizer metadata lacks {key}")
    return metadata[key]
