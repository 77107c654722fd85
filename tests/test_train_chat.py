"""Training on chat exchanges (--chat-every): the ids are those `pybitnet chat` feeds the model, and a model
trained on them ends its turns with <|eot_id|>, where one trained on plain text never does."""

from __future__ import annotations

import random

import pytest
import torch

import pybitnet
from pybitnet import load_tokenizer
from pybitnet.errors import InputError
from pybitnet.train import data
from pybitnet.train.trainer import Run, TrainOptions

WORDS = ("the king said unto them and the people went up to the city of gold in the morning when light "
         "came over the water a man and his son walked by the river and spoke of bread wine and peace").split()

pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(path, lines: int = 400, seed: int = 0):
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))).capitalize() + "."
                     for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _options(tmp_path, name: str, **changes) -> TrainOptions:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        _corpus(corpus)
    base = dict(corpus=str(corpus), preset="tiny", out=str(tmp_path / name), tokens=60 * 4 * 32, batch=4, ctx=32,
                lr=1e-2, seed=0, eval_every=1000, eval_windows=2, checkpoint_every=1000)
    base.update(changes)
    return TrainOptions(**base)


def test_chat_exchanges_are_the_ids_chat_feeds_the_model(tmp_path):
    run = Run(_options(tmp_path, "run", chat_every=2, tokens=32 * 4), progress=False)
    run.train()
    run.write_outputs()
    tok = load_tokenizer(tmp_path / "run")
    lines = ["And he said unto them.\n", "Go up to the city.\n", "A man walked.\n", "By the river.\n",
             "The king spoke.\n", "Of bread and wine.\n"]
    ids = data.encode_with_chat(run.tokenizer, "".join(lines), 2).tolist()
    chat = tok.encode_chat([{"role": "user", "content": "A man walked."}])  # what `pybitnet chat` would feed
    expected = ([i for line in lines[:2] for i in tok.encode(line, add_special_tokens=False)]
                + chat + tok.encode("By the river.", add_special_tokens=False) + [tok.token_to_id("<|eot_id|>")]
                + [i for line in lines[4:] for i in tok.encode(line, add_special_tokens=False)])
    assert ids == expected
    assert data.encode_with_chat(run.tokenizer, "".join(lines), 0).tolist() == data.encode(run.tokenizer, "".join(lines)).tolist()


def _reply(model, prompt: list[int], eot: int, limit: int = 40) -> list[int]:
    ids = list(prompt)
    for _ in range(limit):
        ids.append(int(model.forward_full(torch.tensor([ids]), logits="last").argmax()))
        if ids[-1] == eot:
            break
    return ids[len(prompt):]


def test_a_model_trained_on_exchanges_ends_its_turns(tmp_path):
    replies = {}
    for name, every in (("plain", 0), ("chat", 1)):
        run = Run(_options(tmp_path, name, chat_every=every), progress=False)
        run.train()
        run.write_outputs()
        tok = load_tokenizer(tmp_path / name)
        model = pybitnet.load(tmp_path / name)
        eot = tok.token_to_id("<|eot_id|>")
        replies[name] = [_reply(model, tok.encode_chat([{"role": "user", "content": text}]), eot)
                         for text in ("The king said unto them.", "A man walked by the river.")]
        replies[name + "-eot"] = eot
    for reply in replies["chat"]:
        assert reply[-1] == replies["chat-eot"] and len(reply) > 2, reply  # a reply of some words, then the turn ends
    for reply in replies["plain"]:
        assert replies["plain-eot"] not in reply and len(reply) == 40  # never trained on <|eot_id|>: runs to the limit


def test_chat_every_must_not_be_negative(tmp_path):
    with pytest.raises(InputError, match="--chat-every must be 0"):
        Run(_options(tmp_path, "run", chat_every=-1), progress=False)
    assert not (tmp_path / "run").exists()
