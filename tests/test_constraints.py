"""Constrained output (JSON schemas, regexes, grammars) through the server with the `openai` client, through
generate() and through `pybitnet generate`, on a tiny random model that could not write JSON by itself."""

from __future__ import annotations

import concurrent.futures
import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

import pybitnet
from constraint_schemas import SCHEMAS
from pybitnet import load_tokenizer
from pybitnet.builtin import builtin_model_path
from pybitnet.constraints import MAX_SOURCE_BYTES, Constraint, ConstraintError
from pybitnet.generate import generate
from pybitnet.sampling import SamplingParams
from test_serve_support import LiveServer

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    """The built-in model: far too small to write JSON by itself, so every valid answer is the constraint's doing."""
    return builtin_model_path()


@pytest.fixture(scope="module")
def model(checkpoint):
    return pybitnet.load(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with LiveServer(model, tokenizer, max_batch=8, max_queue=32, context=512, model_name="tiny") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_answer_follows_its_json_schema(client, name):
    schema = SCHEMAS[name]
    for temperature, seed in ((0.0, None), (1.0, 7)):
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=_schema_format(schema),
                                               max_tokens=300, temperature=temperature, seed=seed)
        choice = reply.choices[0]
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "stop"


def test_json_object_answers_an_object_or_is_cut(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                           max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"


def test_max_tokens_cuts_a_constrained_answer_with_length(client):
    schema = SCHEMAS["nested"]
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=_schema_format(schema),
                                           max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert len(reply.choices[0].token_ids) == 3
    assert reply.choices[0].message.content.startswith('{"')


def test_guided_fields_on_completions(client):
    out = client.completions.create(model="tiny", prompt="The code is", max_tokens=20, temperature=0,
                                    extra_body={"guided_regex": "[a-z]{3}-[0-9]{2}"})
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", out.choices[0].text) and out.choices[0].finish_reason == "stop"
    lark = 'start: answer " " NUMBER\nanswer: "yes" | "no"\nNUMBER: /[0-9]/\n'
    out = client.completions.create(model="tiny", prompt="Is it?", max_tokens=20, temperature=1.0, seed=3,
                                    extra_body={"guided_grammar": lark})
    assert re.fullmatch("(yes|no) [0-9]", out.choices[0].text)
    gbnf = 'root ::= ("yes" | "no") "!"'
    out = client.completions.create(model="tiny", prompt="Is it?", max_tokens=20, temperature=0,
                                    extra_body={"grammar": gbnf})
    assert out.choices[0].text in ("yes!", "no!")
    schema = SCHEMAS["$ref/$defs"]
    out = client.completions.create(model="tiny", prompt=["One", "Two words", "Three more words"], max_tokens=100,
                                    temperature=0, extra_body={"guided_json": schema})
    assert len(out.choices) == 3
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.text), schema)


def test_guided_fields_on_chat(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0,
                                           extra_body={"guided_regex": "(red|green|blue)!"})
    assert reply.choices[0].message.content in ("red!", "green!", "blue!")
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100, temperature=0,
                                           extra_body={"guided_json": json.dumps(SCHEMAS["enum"])})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS["enum"])


def test_stop_strings_and_choices_still_apply(client):
    out = client.completions.create(model="tiny", prompt="The code is", max_tokens=20, temperature=0, n=2,
                                    extra_body={"guided_regex": "[a-z]{12}"})
    assert all(re.fullmatch("[a-z]{12}", c.text) and c.finish_reason == "stop" for c in out.choices)
    first = out.choices[0].text
    stop = first[5]
    cut = client.completions.create(model="tiny", prompt="The code is", max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"guided_regex": "[a-z]{12}"})
    assert cut.choices[0].text == first[: first.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": _schema_format({"type": "strin"})}, "response_format", "strin"),
    ({"response_format": _schema_format({"type": "array", "uniqueItems": True})}, "response_format", "uniqueItems"),
    ({"response_format": _schema_format({"type": "object", "description": "x" * MAX_SOURCE_BYTES})},
     "response_format", "at most"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"guided_regex": "[0-9"}, "guided_regex", "regex"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar", "nothing_defined"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "guided_json": {"type": "integer"}}, "guided_regex", "one way"),
])
def test_a_constraint_that_cannot_work_is_a_400_naming_why(server, body, param, words):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"messages": MESSAGES, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_streaming_equals_non_streaming(client):
    schema = SCHEMAS["array of objects"]
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=_schema_format(schema),
                                           max_tokens=200, temperature=0)
    text, tokens, finish = "", [], None
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0,
                                                response_format=_schema_format(schema), stream=True):
        delta = chunk.choices[0].delta
        text += delta.content or ""
        tokens += chunk.choices[0].model_extra.get("token_ids") or []
        finish = chunk.choices[0].finish_reason or finish
    assert text == whole.choices[0].message.content and tokens == whole.choices[0].token_ids
    assert finish == whole.choices[0].finish_reason == "stop"


def test_seeded_constrained_sampling_repeats(client):
    def ask():
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, temperature=1.0,
                                               seed=11, response_format=_schema_format(SCHEMAS["nested"]))
        return reply.choices[0].token_ids

    assert ask() == ask()


def test_batch_invariance_alone_and_among_seven_others(client):
    schema = SCHEMAS["array of objects"]

    def constrained():
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=150, temperature=0,
                                               logprobs=True, top_logprobs=3, response_format=_schema_format(schema))
        choice = reply.choices[0]
        return choice.token_ids, [(t.logprob, [a.logprob for a in t.top_logprobs]) for t in choice.logprobs.content]

    def neighbour(i: int):
        extra = {"response_format": _schema_format(SCHEMAS[sorted(SCHEMAS)[i]])} if i % 2 else {}
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"neighbour {i}" * (i + 1)}],
                                       max_tokens=120, temperature=0.8, seed=i, **extra)

    alone = constrained()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(neighbour, i) for i in range(7)]
        crowded = pool.submit(constrained)
        for other in others:
            other.result()
        assert crowded.result() == alone


def test_logprobs_are_the_models_own(client, model, tokenizer):
    """The reported logprob of a constrained answer's first token is the model's, not the masked distribution's."""
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=5, response_format=_schema_format(SCHEMAS["enum"]))
    first = reply.choices[0].logprobs.content[0]
    ids = tokenizer.encode_chat(MESSAGES)
    logprobs = torch.log_softmax(model.forward_full(torch.tensor([ids]), logits="last")[0].double(), dim=-1)
    token = reply.choices[0].token_ids[0]
    assert first.logprob == pytest.approx(float(logprobs[token]), abs=1e-4)
    assert first.logprob < 0  # masked to one allowed token, the distribution would have given it logprob 0
    assert [a.logprob for a in first.top_logprobs] == pytest.approx(torch.topk(logprobs, 5).values.tolist(), abs=1e-4)


# -- Python and the command line ------------------------------------------------------------------------------


def test_generate_batched_rows_each_follow_their_constraint(model, tokenizer):
    names = ["flat", "nested", "array bounds", "tuple"]
    constraints = [Constraint.json_schema(SCHEMAS[n], tokenizer, vocab_size=model.config.vocab_size) for n in names]
    prompts = ["Hello", "The quick brown fox", "1, 2, 3,", "Numbers"]
    result = generate(model, tokenizer, prompts, max_new_tokens=200, constraint=constraints)
    for name, text, finish in zip(names, result.texts, result.finish_reasons):
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        assert finish == "grammar"
    # each row as it would be alone
    for i, prompt in enumerate(prompts):
        alone = generate(model, tokenizer, [prompt], max_new_tokens=200, constraint=constraints[i])
        assert alone.token_ids[0] == result.token_ids[i]
    one = Constraint.regex("[0-9]{2}-[a-z]{2}", tokenizer, vocab_size=model.config.vocab_size)
    sampled = generate(model, tokenizer, prompts, max_new_tokens=20, constraint=one,
                       sampling=SamplingParams(temperature=1.0), seed=5)
    assert all(re.fullmatch("[0-9]{2}-[a-z]{2}", t) for t in sampled.texts)
    mixed = generate(model, tokenizer, prompts[:2], max_new_tokens=8, constraint=[None, one])
    assert mixed.finish_reasons[0] != "grammar" and re.fullmatch("[0-9]{2}-[a-z]{2}", mixed.texts[1])


def test_constraint_errors_and_cache(tokenizer):
    with pytest.raises(ConstraintError, match="strin"):
        Constraint.json_schema({"type": "strin"}, tokenizer)
    with pytest.raises(ConstraintError, match="regex"):
        Constraint.regex("(", tokenizer)
    with pytest.raises(ConstraintError, match="at most"):
        Constraint.regex("a" * (MAX_SOURCE_BYTES + 1), tokenizer)
    assert Constraint.json_schema(SCHEMAS["enum"], tokenizer) is Constraint.json_schema(
        json.dumps(SCHEMAS["enum"]), tokenizer)


def test_cli_json_schema_output_validates(checkpoint, tmp_path, cli):
    schema = SCHEMAS["optional properties"]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    done = cli("generate", str(checkpoint), "Hello", "--json-schema", str(path), "-n", "100", "--no-stream")
    assert done.code == 0, done.err
    jsonschema.validate(json.loads(done.out), schema)
    assert "stop: grammar" in done.err
    done = cli("generate", str(checkpoint), "Hello", "--regex", "[a-z]{4}", "--grammar", str(path))
    assert done.code != 0 and "at most one" in done.err
    path.write_text(json.dumps({"type": "strin"}))
    done = cli("generate", str(checkpoint), "Hello", "--json-schema", str(path))
    assert done.code != 0 and "strin" in done.err
