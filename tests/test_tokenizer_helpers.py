"""Builders of small tokenizers for the text tests (no test functions here; imported by the text tests).

Tokenizers are trained on the spot with HF `tokenizers`, shaped like the real vocabularies: a LLaMA-3-style
byte-level BPE (split regex, ignore_merges, BOS template, <|eot_id|>) for 2B-4T, and a SentencePiece BPE for the
1bitLLM family. GGUF metadata is derived from the same files as a plain dict of tokenizer.ggml.* keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pybitnet.tokenizer import LLAMA3_SPLIT_REGEX, TOKEN_CONTROL, TOKEN_NORMAL

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "BitNet b1.58 models use ternary weights: -1, 0 and +1, with one scale per tensor.",
    "Hello world! How are you today? I'm fine, thanks; we'll see what they've done.",
    "Numbers like 12345 and 2025 are split into groups of three digits: 123 45.",
    "Unicode text: café, naïve, jalapeño, Größe, 日本語のテキスト, 한국어, emoji 🙂🚀 and ∑ symbols.",
    "User: what is the capital of France?\nAssistant: The capital of France is Paris.",
    "Tabs\tand  double  spaces,\n\nnew lines\r\nand trailing spaces   ",
    "def forward(self, x):\n    return self.proj(x) * self.scale  # a comment",
    "Streaming decoders must not print half of a multi-byte character like é or 語.",
    "In the beginning the model knew nothing; after training it predicts the next token.",
] * 4

# The 2B-4T chat template, as a jinja string in tokenizer_config.json (docs/formats.md).
BITNET_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = message['role'] | capitalize + ': ' + "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def train_llama3_style_bpe(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE with LLaMA-3's pre-tokenizer, specials at the end of the vocab and a BOS template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # LLaMA-3 keeps its specials after the ordinary pieces and sets ignore_merges; mirror both in the JSON.
    spec = json.loads(tokenizer.to_str())
    spec["model"]["ignore_merges"] = True
    base = len(spec["model"]["vocab"])
    for offset, content in enumerate((BOS, EOS, EOT)):
        spec["model"]["vocab"][content] = base + offset
        spec["added_tokens"].append({"id": base + offset, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [base], "tokens": [BOS]}},
    }
    return Tokenizer.from_str(json.dumps(spec))


def save_hf_tokenizer(directory: Path, tokenizer: Tokenizer, *, chat_template: str | None = BITNET_CHAT_TEMPLATE,
                      generation_eos: list[int] | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json) as an HF checkpoint carries them."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "model_max_length": 1024, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))


def gguf_metadata_from_hf(tokenizer_json: Path, *, bos: str = BOS, eos: str = EOS) -> dict:
    """The tokenizer.ggml.* keys llama.cpp's converter writes for a gpt2-type (byte-level BPE) vocab."""
    spec = json.loads(tokenizer_json.read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    special_ids = {t["id"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {
        "general.architecture": "bitnet-b1.58",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TOKEN_CONTROL if i in special_ids else TOKEN_NORMAL for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab[bos],
        "tokenizer.ggml.eos_token_id": vocab[eos],
        "tokenizer.ggml.padding_token_id": vocab[eos],
        "tokenizer.ggml.add_bos_token": True,
    }


def write_tiny_checkpoint(directory: Path, *, tied: bool = False, seed: int = 1, max_position_embeddings: int = 256,
                          num_layers: int = 2) -> Path:
    """A tiny BitNet checkpoint (save_hf) with the LLaMA-3-style tokenizer beside it; vocab 400 = the tokenizer's.

    Untied by default: a tied random model mostly repeats its last token, which proves nothing about decoding.
    """
    from pybitnet.config import preset
    from pybitnet.loaders.hf import save_hf
    from pybitnet.synthetic import random_weights

    tokenizer = train_llama3_style_bpe(400)
    config = preset("tiny").replace(
        vocab_size=tokenizer.get_vocab_size(), tie_word_embeddings=tied, num_layers=num_layers,
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_ids=(tokenizer.token_to_id(EOS), tokenizer.token_to_id(EOT)),
    )
    save_hf(directory, config, random_weights(config, seed=seed))
    save_hf_tokenizer(directory, tokenizer)
    return directory
