"""The built-in trained model: it ships with the package, loads, and its file forms agree exactly.

The passage below is from the held-out split of its training corpus (King James Version, Genesis 27),
which the model never trained on.
"""

from __future__ import annotations

import math

import pytest
import torch

import pybitnet
from pybitnet import load_tokenizer
from pybitnet.builtin import BUILTIN_MODEL, builtin_model_path
from pybitnet.evaluate import token_logprobs
from pybitnet.generate import generate
from pybitnet.sampling import SamplingParams
from pybitnet.session import Conversation
from pybitnet.loaders import load_weights
from pybitnet.loaders.gguf import write_gguf
from pybitnet.tokenizer import gguf_tokenizer_metadata

import reference_numpy
from rules import assert_float64_rule

HELD_OUT = ("And when Esau heard the words of his father, he cried with a great and exceeding bitter cry, and said "
            "unto his father, Bless me, even me also, O my father.\nAnd he said, Thy brother came with subtilty, "
            "and hath taken away thy blessing.\n")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held_out_ids():
    return load_tokenizer(builtin_model_path()).encode(HELD_OUT)


def test_builtin_model_is_in_the_package():
    path = builtin_model_path()
    assert path == BUILTIN_MODEL and path.is_dir()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 30 * 2**20, f"the built-in model takes {size / 2**20:.1f} MiB"
    config = pybitnet.load(path).config
    assert (config.hidden_act, config.sub_norms, config.tie_word_embeddings) == ("relu2", True, True)
    assert config.num_heads > config.num_kv_heads


def test_builtin_model_predicts_held_out_text_far_better_than_chance(held_out_ids):
    model = pybitnet.load(builtin_model_path())
    logp = token_logprobs(model, held_out_ids)
    perplexity = math.exp(-float(logp.mean()))
    # uniform guessing gives the vocabulary size; the trained model is measured at a small fraction of it
    assert perplexity < model.config.vocab_size / 20, f"held-out perplexity {perplexity:.1f}"


def test_builtin_model_generates_words(held_out_ids):
    model = pybitnet.load(builtin_model_path())
    tokenizer = load_tokenizer(builtin_model_path())
    text = generate(model, tokenizer, ["And the LORD said unto"], max_new_tokens=24, seed=0).texts[0]
    words = text.split()
    assert len(words) >= 5
    common = {"the", "and", "of", "to", "unto", "that", "he", "in", "his", "shall", "i", "a", "them", "not", "is", "for"}
    assert any(w.strip(",.;:").lower() in common for w in words), text


def test_builtin_model_ends_its_chat_turns():
    # Trained with chat exchanges ending in <|eot_id|>: a reply ends there instead of running to the token limit.
    model = pybitnet.load(builtin_model_path())
    tokenizer = load_tokenizer(builtin_model_path())
    sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)  # `pybitnet chat`'s defaults
    messages = ["Hello, who are you?", "Where is the ark of the covenant?", "How many sons had Jacob?",
                "Blessed are the meek: for they shall inherit the earth.", "And Jesus answered and said unto them,",
                "Tell me about the king of Israel.", "The LORD is my shepherd; I shall not want.", "Thank you. Goodbye."]
    reasons = []
    for seed, message in enumerate(messages):
        chat = Conversation(model, tokenizer)
        chat.append("user", message)
        reasons.append(chat.generate(max_new_tokens=128, sampling=sampling, seed=seed).finish_reasons[0])
    assert reasons.count("stop_token") >= 6, reasons


def test_builtin_gguf_forms_give_bit_identical_logits_and_match_numpy_reference(tmp_path, held_out_ids):
    path = builtin_model_path()
    config, weights, _ = load_weights(path)
    metadata = gguf_tokenizer_metadata(load_tokenizer(path), config.vocab_size)
    forms = [path]
    for qtype in ("i2_s", "tq2_0"):
        forms.append(tmp_path / f"builtin-{qtype}.gguf")
        write_gguf(forms[-1], config, weights, qtype, metadata)
    tokens = torch.tensor([held_out_ids])
    for dtype in (torch.float32, torch.float64):
        hf, i2s, tq2 = (pybitnet.load(f, dtype=dtype).forward_full(tokens) for f in forms)
        assert torch.equal(hf, i2s) and torch.equal(hf, tq2)
    reference = reference_numpy.ReferenceModel.from_hf_dir(path).forward(held_out_ids)
    assert_float64_rule(hf[0], torch.from_numpy(reference))
