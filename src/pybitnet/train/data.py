"""Training data: a byte-level BPE tokenizer trained on the corpus, a held-out split, token windows.

The corpus is cut into blocks of BLOCK_LINES lines; every VALIDATION_EVERY-th block is held out, so
validation text comes from all over the corpus and never overlaps training text. Windows for step s
come from a generator seeded with (seed, s) alone: a resumed run draws the same batches as a
straight one, with no sampler state to save.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..errors import InputError

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = (BOS, EOS, EOT)  # ids 0, 1, 2
BLOCK_LINES = 40
VALIDATION_EVERY = 20
# The 2B-4T chat format (`User: ...<|eot_id|>Assistant: `) as a template, so `pybitnet chat` works.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def read_corpus(path: str | Path) -> tuple[str, str]:
    """(training text, held-out text) of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"corpus {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"corpus {path}: not UTF-8 text ({err})") from None
    lines = [line for line in lines if line.strip()]
    if len(lines) < 2 * BLOCK_LINES:
        raise InputError(f"corpus {path}: {len(lines)} non-empty lines, too little text to train on "
                         f"(at least {2 * BLOCK_LINES})")
    train, held_out = [], []
    for index, start in enumerate(range(0, len(lines), BLOCK_LINES)):
        block = lines[start : start + BLOCK_LINES]
        (held_out if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).extend(block)
    if not held_out:  # a short corpus: hold out its last block
        held_out, train = train[-BLOCK_LINES:], train[:-BLOCK_LINES]
    return "\n".join(train) + "\n", "\n".join(held_out) + "\n"


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 / LLaMA-3 style) with BOS/EOS/EOT as ids 0-2; BOS added on encode."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InputError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least 259)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                             special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template), each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "tokenizer.json", tokenizer.to_str())
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
              "model_max_length": 1 << 20, "tokenizer_class": "PreTrainedTokenizerFast"}
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))
    atomic_write_text(directory / "generation_config.json",
                      json.dumps({"bos_token_id": tokenizer.token_to_id(BOS),
                                  "eos_token_id": [tokenizer.token_to_id(EOS), tokenizer.token_to_id(EOT)]}, indent=2))


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """All of `text` as one id stream (1-D int64), encoded line by line without BOS."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(text.splitlines(keepends=True), add_special_tokens=False):
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.long)


def encode_with_chat(tokenizer: Tokenizer, text: str, every: int) -> torch.Tensor:
    """`text` as one id stream like encode(), except that every `every`-th pair of consecutive lines (a, b)
    is a chat exchange: the ids the chat template gives a conversation of user message a, ready for the
    reply (what `pybitnet chat` feeds the model), then b's ids and <|eot_id|>. A model trained on it
    sees replies end with <|eot_id|>, and so learns to end its turns."""
    if every <= 0:
        return encode(tokenizer, text)
    lines = text.splitlines(keepends=True)
    pieces: list[tuple[str, bool]] = []  # (text, is a chat reply)
    for start in range(0, len(lines), 2):
        pair = lines[start : start + 2]
        if len(pair) == 2 and (start // 2) % every == every - 1:
            user, reply = (line.strip() for line in pair)
            # CHAT_TEMPLATE for [{"role": "user", "content": user}] with the generation prompt
            pieces += [(f"{BOS}User: {user}{EOT}Assistant: ", False), (reply, True)]
        else:
            pieces += [(line, False) for line in pair]
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for (_, is_reply), encoding in zip(pieces, tokenizer.encode_batch([t for t, _ in pieces], add_special_tokens=False)):
        ids.extend(encoding.ids)
        if is_reply:
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def batch_at(ids: torch.Tensor, step: int, batch: int, ctx: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T), targets (B, T)) of `batch` windows drawn for `step`: the same for the same (seed, step)."""
    if ids.numel() < ctx + 2:
        raise InputError(f"the training split holds {ids.numel()} tokens, fewer than one window of {ctx + 1}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - ctx - 1, (batch,), generator=gen)
    windows = torch.stack([ids[s : s + ctx + 1] for s in starts.tolist()])  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def validation_windows(ids: torch.Tensor, ctx: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping (N, T + 1) windows from the start of the held-out ids."""
    count = min(max_windows, (ids.numel() - 1) // ctx)
    if count < 1:
        raise InputError(f"the held-out split holds {ids.numel()} tokens, fewer than one window of {ctx + 1}")
    return torch.stack([ids[i * ctx : i * ctx + ctx + 1] for i in range(count)])


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: write_bytes(tmp, text.encode("utf-8")))


def write_bytes(tmp: str, payload: bytes) -> None:
    with open(tmp, "wb") as f:  # through Python's own file: a full disk is an OSError that says so
        f.write(payload)


def atomic_write(path: str | Path, write) -> None:
    """Call write(temporary path) in path's directory, then move the result over `path` in one step.

    Either `path` holds the whole new file or it is left as it was; the temporary file never stays
    behind. A failed write (a full disk, a closed share) is an OSError naming `path` and the cause.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _naming(err, path) from None
    os.close(fd)
    try:
        write(tmp)
        _sync(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; model files are for everyone to read
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _naming(err, path) from None
        if isinstance(err, Exception) and disk_full(path.parent):  # writers that wrap the OSError in their own type
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def _sync(path: str) -> None:
    """The file's data on disk before it is moved over the old one (a crash then leaves one or the other)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _naming(err: OSError, path: Path) -> OSError:
    """`err` as an OSError that names `path` (the file meant, not its temporary name)."""
    if err.errno is None:
        return OSError(f"{err}: {path}")
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


def disk_full(directory: str | Path) -> bool:
    """Whether the filesystem holding `directory` has no space left for this process."""
    try:
        return os.statvfs(directory).f_bavail == 0
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        return False
