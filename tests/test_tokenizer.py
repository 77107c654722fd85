"""Tokenizer: HF-directory loading, GGUF-metadata building, chat format, streaming decode, errors."""

from __future__ import annotations

import io
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pybitnet import load_tokenizer
from pybitnet.errors import CheckpointError, InputError
from pybitnet.tokenizer import (
    SPM_SPACE,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    IncrementalDecoder,
    Tokenizer,
    format_bitnet_chat,
)
from test_tokenizer_helpers import (
    BOS,
    CORPUS,
    EOS,
    EOT,
    gguf_metadata_from_hf,
    save_hf_tokenizer,
    train_llama3_style_bpe,
)

TEXTS = sorted(set(CORPUS)) + [
    "",
    " ",
    "a",
    "  leading and trailing  ",
    "unseen words: zyxwvut qqq",
    "specials inline: <|eot_id|> and <|begin_of_text|>x",
    "mixed 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ — “quotes” and ‘apostrophes’ don't",
    "1234567890 3.14159",
    "\n\n\t\r\n",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "  What is BitNet?  "},
    {"role": "assistant", "content": "A ternary language model."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(directory, train_llama3_style_bpe(), generation_eos=[398, 399])
    return directory


@pytest.fixture(scope="module")
def auto_tokenizer(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


def test_hf_dir_round_trip_and_agrees_with_transformers(hf_dir, auto_tokenizer):
    tok = load_tokenizer(hf_dir)
    assert tok.vocab_size == 400
    assert tok.bos_token_id == 397 and tok.eos_token_id == 398 and tok.eot_token_id == 399
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == auto_tokenizer(text)["input_ids"], text
        assert ids[0] == tok.bos_token_id
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        # Byte-level BPE is lossless: decoding (specials kept, BOS dropped) gives the text back exactly.
        assert tok.decode(ids[1:], skip_special_tokens=False) == text
        assert tok.decode(ids) == auto_tokenizer.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == auto_tokenizer.decode(ids, skip_special_tokens=False)
    # A special token written in the text is one token, not pieces of "<|eot_id|>".
    assert tok.encode("a<|eot_id|>b", add_special_tokens=False).count(399) == 1


def test_stop_tokens_include_eos_eot_and_generation_config(hf_dir):
    assert load_tokenizer(hf_dir).stop_token_ids == (398, 399)


def test_load_tokenizer_accepts_a_file_inside_the_directory(hf_dir):
    assert load_tokenizer(hf_dir / "tokenizer_config.json").encode("hello") == load_tokenizer(hf_dir).encode("hello")


def test_gguf_built_byte_level_bpe_agrees_with_hf(hf_dir):
    hf = load_tokenizer(hf_dir)
    built = Tokenizer.from_gguf_metadata(gguf_metadata_from_hf(hf_dir / "tokenizer.json"))
    assert built.vocab_size == hf.vocab_size
    assert (built.bos_token_id, built.eos_token_id, built.stop_token_ids) == (397, 398, (398, 399))
    for text in TEXTS:
        assert built.encode(text) == hf.encode(text), text
        assert built.decode(built.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_gguf_file_on_disk_loads_same_tokenizer(hf_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    metadata = gguf_metadata_from_hf(hf_dir / "tokenizer.json")
    path = tmp_path / "tokenizer-only.gguf"
    writer = gguf.GGUFWriter(str(path), arch="bitnet-b1.58")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_file, hf = load_tokenizer(path), load_tokenizer(hf_dir)
    for text in TEXTS:
        assert from_file.encode(text) == hf.encode(text)


def test_gguf_add_bos_false_leaves_bos_out(hf_dir):
    metadata = gguf_metadata_from_hf(hf_dir / "tokenizer.json") | {"tokenizer.ggml.add_bos_token": False}
    built = Tokenizer.from_gguf_metadata(metadata)
    assert built.encode("hello") == load_tokenizer(hf_dir).encode("hello")[1:]


def test_chat_template_matches_transformers(hf_dir, auto_tokenizer):
    tok = load_tokenizer(hf_dir)
    for turns in (MESSAGES[1:2], MESSAGES, MESSAGES[:3]):
        for add_generation_prompt in (True, False):
            expected = auto_tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert tok.apply_chat_template(turns, add_generation_prompt=add_generation_prompt) == expected
            expected_ids = auto_tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=add_generation_prompt)
            if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys"):  # transformers 5 returns a BatchEncoding
                expected_ids = expected_ids["input_ids"]
            assert tok.encode_chat(turns, add_generation_prompt=add_generation_prompt) == list(expected_ids)


def test_builtin_bitnet_format_without_template(hf_dir, tmp_path):
    save_hf_tokenizer(tmp_path, HFTokenizer.from_file(str(hf_dir / "tokenizer.json")), chat_template=None)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    text = tok.apply_chat_template(MESSAGES[1:2])
    assert text == f"{BOS}User: What is BitNet?{EOT}Assistant: "
    ids = tok.encode_chat(MESSAGES[1:2])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # BOS once, from the format only
    # The template-rendered and the built-in formats are the same text for the 2B-4T template.
    assert load_tokenizer(hf_dir).apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    # The official 2B-4T GGUF's embedded template is ignored in favour of the built-in format.
    metadata = gguf_metadata_from_hf(hf_dir / "tokenizer.json") | {"tokenizer.chat_template": "{{ 'wrong' }}"}
    assert Tokenizer.from_gguf_metadata(metadata).apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    assert format_bitnet_chat(MESSAGES[:1], bos_token="<s>", eot_token="</s>", add_generation_prompt=False) == (
        "<s>System: You are a helpful assistant.</s>"
    )


def test_bad_chat_messages_raise_input_error(hf_dir):
    with pytest.raises(InputError, match="role"):
        load_tokenizer(hf_dir).apply_chat_template([{"content": "no role"}])


def test_missing_tokenizer_is_a_clear_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bitnet"}))
    with pytest.raises(CheckpointError, match="no tokenizer in .*tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="absent: no such file or directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_tokenizer(tmp_path)


def test_gguf_without_vocab_or_unknown_model_is_a_clear_error(hf_dir):
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "bitnet"}, source="m.gguf")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "no_vocab"})
    metadata = gguf_metadata_from_hf(hf_dir / "tokenizer.json")
    with pytest.raises(CheckpointError, match="unsupported tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf_metadata(metadata | {"tokenizer.ggml.model": "bert"})
    with pytest.raises(CheckpointError, match="lacks tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata({k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(CheckpointError, match="pre-tokenizer"):
        Tokenizer.from_gguf_metadata(metadata | {"tokenizer.ggml.pre": "qwen2"})


def test_incremental_decoder_holds_back_split_utf8(hf_dir):
    tok = load_tokenizer(hf_dir)
    text = " naïve 日本語 🙂🚀 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the small vocab splits the multi-byte characters into byte tokens
    decoder = IncrementalDecoder(tok, context_ids=tok.encode("Prompt:"))
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces  # some tokens ended inside a character and were held back
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_incremental_decoder_flushes_an_unfinished_character(hf_dir):
    tok = load_tokenizer(hf_dir)
    first_byte_of_emoji = tok.token_to_id("ð")  # byte-level alphabet: byte 0xF0 is the character "ð"
    decoder = IncrementalDecoder(tok)
    assert decoder.push(tok.token_to_id("a")) == "a"
    assert decoder.push(first_byte_of_emoji) == ""
    assert decoder.flush() == "\ufffd"


# -- SentencePiece-style ("llama") vocabularies -----------------------------------------------------------------


def _metaspace_vocab() -> tuple[list[str], list[int], list[float]]:
    """A LLaMA-2-shaped vocab (<unk>, <s>, </s>, 256 byte pieces, then pieces by merge rank) and SPM-like scores."""
    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="always", split=True)
    trained.decoder = decoders.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    merged = [left + right for left, right in (m if isinstance(m, list) else m.split(" ") for m in spec["merges"])]
    alphabet = [t for t in sorted(spec["vocab"], key=spec["vocab"].get) if len(t) == 1]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    scores = [0.0] * len(tokens)
    for rank, piece in enumerate(dict.fromkeys(merged)):
        tokens.append(piece), types.append(TOKEN_NORMAL), scores.append(-float(rank))
    for piece in alphabet:
        tokens.append(piece), types.append(TOKEN_NORMAL), scores.append(-1e6)
    return tokens, types, scores


def _spm_reference_encode(text: str, tokens: list[str], types: list[int], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece BPE, written plainly: merge the best-scoring adjacent pair (leftmost on ties)
    until none is in the vocab, then spell unknown symbols as <0xXX> byte pieces."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL}
    symbols = list((" " + text).replace(" ", SPM_SPACE)) if text else []
    while True:
        best = None
        for i in range(len(symbols) - 1):
            piece = symbols[i] + symbols[i + 1]
            if piece in vocab and (best is None or scores[vocab[piece]] > best[0]):
                best = (scores[vocab[piece]], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for symbol in symbols:
        ids.extend([vocab[symbol]] if symbol in vocab else [tokens.index(f"<0x{b:02X}>") for b in symbol.encode()])
    return ids


def _llama_metadata(tokens, types, scores) -> dict:
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


SPM_TEXTS = [t for t in TEXTS if "<|" not in t] + ["x", "  two leading", "é at start", "end with é"]


def test_gguf_llama_vocab_matches_reference_spm_bpe():
    tokens, types, scores = _metaspace_vocab()
    tok = Tokenizer.from_gguf_metadata(_llama_metadata(tokens, types, scores))
    assert tok.bos_token_id == 1 and tok.stop_token_ids == (2,)
    for text in SPM_TEXTS:
        expected = _spm_reference_encode(text, tokens, types, scores)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.encode(text) == [1] + expected
        assert tok.decode(expected) == text  # byte fallback makes it lossless; the dummy-prefix space is stripped


def test_gguf_llama_vocab_matches_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.99, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    types = [TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_CONTROL if sp.is_control(i)
             else TOKEN_BYTE if sp.is_byte(i) else TOKEN_NORMAL for i in range(n)]
    tok = Tokenizer.from_gguf_metadata(
        _llama_metadata([sp.id_to_piece(i) for i in range(n)], types, [sp.get_score(i) for i in range(n)])
    )
    # Control-token strings typed in the text ("<s>") are the one documented difference: llama.cpp and HF parse
    # them as specials, sentencepiece spells them out, so SPM_TEXTS has none.
    for text in SPM_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_incremental_decoder_keeps_word_spaces_with_sentencepiece():
    tokens, types, scores = _metaspace_vocab()
    tok = Tokenizer.from_gguf_metadata(_llama_metadata(tokens, types, scores))
    prompt = tok.encode("The answer is")
    continuation = tok.encode("The answer is forty two, jalapeño", add_special_tokens=False)[len(prompt) - 1:]
    decoder = IncrementalDecoder(tok, context_ids=prompt)
    pieces = [decoder.push(i) for i in continuation]
    # In context each word keeps its leading space, which decoding the new ids alone would strip.
    assert "".join(pieces) + decoder.flush() == " forty two, jalapeño"
    assert tok.decode(continuation) == "forty two, jalapeño"
