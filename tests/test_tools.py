"""Tool calls through the server with the `openai` client: tool_choice required / named / auto / none, the
OpenAI shapes of message.tool_calls and of streamed delta.tool_calls, multi-turn conversations with tool
results, and how the tools reach the chat template. The model is a tiny random one: every call it makes is
the grammar's doing."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

import pybitnet
from pybitnet import load_tokenizer
from pybitnet.serve.protocol import ChatMessage
from pybitnet.serve.tools import MAX_TOOLS, chat_messages, parse_tools
from test_serve_support import LiveServer
from test_tokenizer_helpers import write_tiny_checkpoint

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^UTC[+-][0-9]$"}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tools"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(pybitnet.load(checkpoint), load_tokenizer(checkpoint), max_batch=4, context=2048,
                    model_name="tiny") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _check_call(call, names=tuple(PARAMETERS)):
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 3), (1.0, 4)])
def test_tool_choice_required_answers_a_call(client, temperature, seed):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=temperature, seed=seed)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_a_named_tool_choice_calls_that_tool(client, name):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": name}},
                                           temperature=1.0, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_call(choice.message.tool_calls[0], names=(name,))


@pytest.mark.parametrize("seed", range(4))
def test_tool_choice_auto_answers_text_or_a_call(client, seed):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                           temperature=1.0, seed=seed)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_call(choice.message.tool_calls[0])
    else:
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(choice.message.content, str) and not choice.message.content.startswith("{")


def test_auto_grammar_allows_both_answers(client):
    """The auto grammar lets a call through: forced to start with '{' by a regex it would be one, and free
    text is allowed too (tool_choice none gives text that may start anywhere)."""
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                           max_tokens=10, temperature=0)
    assert reply.choices[0].message.tool_calls is None and isinstance(reply.choices[0].message.content, str)


def test_streamed_tool_calls_equal_the_whole_answer(client):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    content, tokens, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        tokens += choice.model_extra.get("token_ids") or []
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                assert call["id"] is None  # the id and name come once, in the call's first delta
                call["id"], call["name"] = delta.id, delta.function.name
            call["arguments"] += delta.function.arguments or ""
    assert content == "" and finish == whole.finish_reason == "tool_calls"
    assert tokens == whole.token_ids
    expected = whole.message.tool_calls[0]
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (expected.function.name, expected.function.arguments)


@pytest.mark.parametrize("seed", range(3))
def test_streamed_auto_answers_equal_the_whole_answer(client, seed):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=1.0, seed=seed)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        arguments += "".join(d.function.arguments or "" for d in choice.delta.tool_calls or [])
        finish = choice.finish_reason or finish
    assert finish == whole.finish_reason
    if whole.message.tool_calls:
        assert content == "" and arguments == whole.message.tool_calls[0].function.arguments
    else:
        assert content == whole.message.content and arguments == ""


def test_a_conversation_with_calls_and_results(client):
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=0).choices[0].message
    call = first.tool_calls[0]
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=10, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [WEATHER] * 2}, "tools", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(MAX_TOOLS + 1)]}, "tools",
     "at most"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools", "strin"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools", "one way"),
])
def test_bad_tools_are_a_400_naming_why(server, body, param, words):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, **body},
                          timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_messages_for_a_template_without_tools():
    """The documented default: a system block lists the tools, earlier calls are the JSON the model wrote, and
    a result is a user message naming its call."""
    setup = parse_tools(TOOLS, "auto")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC+1"}'}}
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="time?"),
                ChatMessage(role="assistant", content=None, tool_calls=[call]),
                ChatMessage(role="tool", tool_call_id="call_1", content="12:00")]
    out, tools = chat_messages(messages, setup, template="{{ messages }}")
    assert tools is None
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"get_weather"' in out[0]["content"] and '"name"' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"name": "get_time", "arguments": {"zone": "UTC+1"}}
    assert out[3] == {"role": "user", "content": "Result of get_time (call_1): 12:00"}


def test_a_template_that_renders_tools_gets_them(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    tokenizer.chat_template = (
        "{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.tool_calls %}"
        "{% for c in m.tool_calls %}(call {{ c.function.name }} {{ c.function.arguments | tojson }}){% endfor %}"
        "{% endif %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{% endfor %}")
    setup = parse_tools(TOOLS, "auto")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC+1"}'}}
    messages = [ChatMessage(role="user", content="time?"), ChatMessage(role="assistant", tool_calls=[call]),
                ChatMessage(role="tool", tool_call_id="call_1", content="12:00")]
    out, tools = chat_messages(messages, setup, tokenizer.chat_template)
    text = tokenizer.apply_chat_template(out, tools=tools)
    assert text == ('[tool get_weather][tool get_time]<user>time?<assistant>(call get_time {"zone": "UTC+1"})'
                    "<tool>12:00#call_1")


def test_the_auto_grammar_takes_text_or_a_call_and_nothing_else(checkpoint):
    from pybitnet.constraints import compile_constraint

    tokenizer = load_tokenizer(checkpoint)
    kind, source = parse_tools(TOOLS, "auto").grammar()
    constraint = compile_constraint(kind, source, tokenizer)

    def takes(text: str) -> bool:
        state = constraint.start()
        return all(state.advance(t) for t in tokenizer.encode(text, add_special_tokens=False))

    assert takes("It is sunny.") and takes('{"name": "get_time", "arguments": {"zone": "UTC+1"}}')
    assert not takes('{"name": "get_time", "arguments": {"zone": "Paris"}}')  # not its pattern
    assert not takes('{"name": "set_alarm", "arguments": {}}')  # no such tool
    assert not takes('{"hello": 1}')  # a '{' starts a call


def test_n_choices_each_answer_a_call(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=1.0, seed=9, n=2)
    assert len(reply.choices) == 2
    ids = set()
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        _check_call(choice.message.tool_calls[0])
        ids.add(choice.message.tool_calls[0].id)
    assert len(ids) == 2


@pytest.mark.parametrize("message", [
    {"role": "user"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": ["x"], "function": {"name": "f"}}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]},
    {"role": "user", "content": "hi", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
])
def test_malformed_tool_messages_are_a_400(server, message):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"messages": MESSAGES + [message], "tools": TOOLS, "max_tokens": 5})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"


def test_a_call_cut_by_max_tokens_is_the_same_streamed_or_not(client, checkpoint):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="required", temperature=0)
    full = client.chat.completions.create(max_tokens=200, **kwargs).choices[0]
    tokenizer = load_tokenizer(checkpoint)
    head = '{"name": "get_weather", "arguments": {"'
    cut = next(n for n in range(1, len(full.token_ids)) if tokenizer.decode(full.token_ids[:n]).startswith(head))
    whole = client.chat.completions.create(max_tokens=cut, **kwargs).choices[0]
    assert whole.finish_reason == "length"
    call = whole.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments.startswith('{"')
    assert full.message.tool_calls[0].function.arguments.startswith(call.function.arguments)
    arguments, finish = "", None
    for chunk in client.chat.completions.create(stream=True, max_tokens=cut, **kwargs):
        choice = chunk.choices[0]
        arguments += "".join(d.function.arguments or "" for d in choice.delta.tool_calls or [])
        finish = choice.finish_reason or finish
    assert finish == "length" and arguments == call.function.arguments
