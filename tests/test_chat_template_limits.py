"""A checkpoint's chat template is untrusted code: its rendering is bounded in time, output size and
number size, and whatever it raises reaches the caller as the engine's own error naming the template."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from pybitnet import tokenizer as tokenizer_module
from pybitnet.errors import CheckpointError, InputError
from pybitnet.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]


def _with_template(template: str) -> Tokenizer:
    backend = HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template=template, source="test-model")


def test_a_well_behaved_template_renders():
    tok = _with_template("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content * 2 }}{% endfor %}"
                         "{{ 2 ** 10 }}")
    assert tok.apply_chat_template(MESSAGES) == "<s>[user] hihi1024"


def test_endless_loops_stop_at_the_time_limit(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_SECONDS", 0.2)
    tok = _with_template("{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}")
    with pytest.raises(CheckpointError, match="chat template of test-model.*longer than 0.2 s"):
        tok.apply_chat_template(MESSAGES)


def test_output_beyond_the_size_limit_is_refused(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_MAX_CHARS", 10_000)
    tok = _with_template("{% for i in range(10**5) %}{{ 'x' * 100 }}{% endfor %}")
    with pytest.raises(CheckpointError, match=r"chat template of test-model.*past \d+ characters"):
        tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("expression", ["'x' * 10**10", "10**10 * 'x'", "[1] * 10**10", "10 ** (10 ** 10)",
                                         "2 ** 60000 * 2 ** 60000"])
def test_huge_values_are_refused_before_they_are_built(expression):
    with pytest.raises(CheckpointError, match="chat template.*too large"):
        _with_template("{{ " + expression + " }}").apply_chat_template(MESSAGES)


@pytest.mark.parametrize("template,cause", [
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ (10 ** 400) | float }}", "OverflowError"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ("{{ messages[5].content }}", "UndefinedError|undefined"),
    ("{{ 1 + 'a' }}", "TypeError"),
])
def test_template_failures_are_our_error(template, cause):
    with pytest.raises(CheckpointError, match=f"chat template of test-model.*({cause})"):
        _with_template(template).apply_chat_template(MESSAGES)


def test_raise_exception_in_a_template_is_an_input_error():
    tok = _with_template("{{ raise_exception('only user turns') }}")
    with pytest.raises(InputError, match="only user turns"):
        tok.apply_chat_template(MESSAGES)
