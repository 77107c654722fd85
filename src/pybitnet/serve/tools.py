"""Tool calls (OpenAI's `tools`, `tool_choice` and `message.tool_calls`) in terms of constrained output.

A model answers a call as one JSON object, {"name": ..., "arguments": {...}}, and this module turns the
request's tools into the grammar that output follows, the conversation into messages a chat template can
render, and the output back into OpenAI's tool_calls, whole or as streamed deltas:

- tool_choice "required": the output is a call of one of the tools (anyOf over each tool's
  {"name": const, "arguments": its parameters} schema); a named function: a call of that one; "auto" (the
  default when tools are given): free text that does not start with "{", or a call; "none": free text.
- The chat template gets the tools when it renders them (its source mentions `tools`): they are passed as
  `tools`, an assistant turn with tool_calls keeps them (arguments as objects, as Hugging Face templates
  take them) and tool results stay `role: "tool"` messages with their `tool_call_id`. Otherwise (the
  documented default, docs/server.md): a system message lists the tools as JSON and asks for that JSON
  object, an earlier call is shown as the JSON the model wrote, and a tool result becomes a user message
  "Result of NAME (ID): CONTENT".
- One call per answer (parallel_tool_calls is accepted and has no effect).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from ..errors import InputError

# Tools one request may declare, and the size of their schemas together (the grammar is compiled per request).
MAX_TOOLS = 64
MAX_TOOLS_BYTES = 64 << 10
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_TOOLS_PROMPT = (
    "You can call the following tools, given as JSON schemas of their parameters:\n{tools}\n"
    "To call a tool, answer with only a JSON object of the form "
    '{{"name": <the tool\'s name>, "arguments": <an object of its parameters>}}. '
    "Otherwise answer in plain text."
)
# The head of a call as the grammar writes it: '{"name": "NAME", "arguments": '
_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')


class RequestError(InputError):
    """A request field that cannot be served; the app answers 400 naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolSetup:
    """A request's tools and what its output may be."""

    tools: list[dict]  # the OpenAI tool objects, checked
    choice: str  # auto | required | none | named
    name: str | None = None  # the function tool_choice names
    names: list[str] = field(default_factory=list)

    @property
    def constrained(self) -> bool:
        return self.choice != "none"

    def call_schema(self) -> dict:
        """The JSON schema of one call of the allowed tools."""
        wanted = [t["function"] for t in self.tools if self.name is None or t["function"]["name"] == self.name]
        options = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                     "arguments": f.get("parameters") or {"type": "object"}},
                    "required": ["name", "arguments"], "additionalProperties": False} for f in wanted]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def grammar(self) -> tuple[str, object]:
        """(constraint kind, source) of the output: a call, or (auto) text not starting with '{' or a call."""
        schema = self.call_schema()
        if self.choice in ("required", "named"):
            return "json_schema", schema
        return "grammar", ("start: TEXT | call\n"
                           "TEXT: /[^{][\\s\\S]*/\n"
                           f"call: %json {json.dumps(schema, separators=(',', ':'))}\n")


def parse_tools(tools, tool_choice) -> ToolSetup | None:
    """Check `tools` and `tool_choice` (raises RequestError); None when the request has no tools."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}", "tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"at most {MAX_TOOLS} tools are accepted, got {len(tools)}", "tools")
    size = len(json.dumps(tools))
    if size > MAX_TOOLS_BYTES:
        raise RequestError(f"the tools are {size} bytes of JSON; at most {MAX_TOOLS_BYTES} are accepted", "tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', "
                               f"got {name!r}", "tools")
        if name in names:
            raise RequestError(f"two tools are named {name!r}", "tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        names.append(name)
    if tool_choice is None or tool_choice in ("auto", "required", "none"):
        return ToolSetup(tools, tool_choice or "auto", names=names)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise RequestError(f"tool_choice names {name!r}, which is not one of the tools ({', '.join(names)})",
                               "tool_choice")
        return ToolSetup(tools, "named", name, names=names)
    raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}', "tool_choice")


def template_renders_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def chat_messages(messages, setup: ToolSetup | None, template: str | None) -> tuple[list[dict], list | None]:
    """The conversation as a chat template takes it, and the tools to hand the template (None: not its
    own way). `messages` are the request's ChatMessage models."""
    own = setup is not None and template_renders_tools(template)
    names = {}  # tool_call_id -> function name, from earlier assistant turns
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if content is not None and not isinstance(content, str):
            content = "".join(part.text for part in content)
        calls = getattr(m, "tool_calls", None) or []
        if content is None and not (m.role == "assistant" and calls):
            raise RequestError(f"messages[{i}] has no content (only an assistant message with tool_calls may "
                               f"leave it out)", "messages")
        if calls and m.role != "assistant":
            raise RequestError(f"messages[{i}]: only assistant messages carry tool_calls", "messages")
        parsed = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                    or not isinstance(call.get("id", ""), str):
                raise RequestError(f"messages[{i}].tool_calls: each needs an id, function.name and "
                                   f"function.arguments", "messages")
            arguments = function.get("arguments") or "{}"
            try:
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            except ValueError:
                raise RequestError(f"messages[{i}].tool_calls: function.arguments is not JSON", "messages") from None
            names[call.get("id")] = function["name"]
            parsed.append({"id": call.get("id"), "type": "function",
                           "function": {"name": function["name"], "arguments": arguments}})
        tool_call_id = getattr(m, "tool_call_id", None)
        if m.role == "tool" and not own:
            name = names.get(tool_call_id, "a tool")
            out.append({"role": "user", "content": f"Result of {name} ({tool_call_id}): {content}"})
        elif parsed and not own:
            text = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                        ensure_ascii=False) for c in parsed)
            out.append({"role": "assistant", "content": ((content or "") + "\n" + text).strip()})
        else:
            message = {"role": m.role, "content": content or ""}
            if parsed:
                message["tool_calls"] = parsed
            if tool_call_id is not None:
                message["tool_call_id"] = tool_call_id
            out.append(message)
    if setup is None or own or not setup.constrained:
        return out, ([t for t in setup.tools] if own else None)
    listing = json.dumps([t["function"] for t in setup.tools], ensure_ascii=False)
    block = DEFAULT_TOOLS_PROMPT.format(tools=listing)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + block}
    else:
        out.insert(0, {"role": "system", "content": block})
    return out, None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def split_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of an output that is one call, else None."""
    head = _HEAD.match(text)
    if head is None:
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or set(call) != {"name", "arguments"} or not isinstance(call["arguments"], dict):
        return None
    arguments = text[head.end():].rstrip()
    return call["name"], arguments[:-1].rstrip()  # the call object's own closing brace dropped


def assistant_message(text: str, finish: str | None, setup: ToolSetup, call_id: str) -> tuple[dict, str | None]:
    """The chat message of a finished output, and its finish_reason ("tool_calls" for a whole call)."""
    call = split_call(text) if setup.constrained else None
    if call is None:
        head = _HEAD.match(text) if setup.constrained and finish != "stop" else None
        if head is None or head.end() == len(text):
            return {"role": "assistant", "content": text}, finish
        call = head.group(1), text[head.end():]  # a call cut short (length): its arguments as far as they got
    name, arguments = call
    message = {"role": "assistant", "content": None,
               "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    return message, "tool_calls" if finish == "stop" else finish


class CallStream:
    """Streamed deltas of one choice's output: content as it comes, or (once the output starts with '{') one
    tool call in OpenAI's delta shape: the id and name first, then the arguments in pieces."""

    def __init__(self, setup: ToolSetup, call_id: str):
        self.setup, self.call_id = setup, call_id
        self.buffer = ""
        self.mode = "text" if not setup.constrained else "undecided"
        self.head_end = -1  # where the arguments start in the buffer, once the head was sent
        self.sent = 0  # characters of the buffer already sent (content, or arguments)

    def feed(self, text: str) -> list[dict]:
        if self.mode == "text":
            return [{"content": text}] if text else []
        self.buffer += text
        if self.mode == "undecided":
            stripped = self.buffer.lstrip()
            if not stripped:
                return []
            if not stripped.startswith("{"):
                self.mode = "text"
                text, self.buffer = self.buffer, ""
                return [{"content": text}]
            self.mode = "call"
        deltas = []
        if self.head_end < 0:
            head = _HEAD.match(self.buffer)
            if head is None or head.end() == len(self.buffer):  # whitespace after the head may still come
                return []
            self.head_end = self.sent = head.end()
            deltas.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                           "function": {"name": head.group(1), "arguments": ""}}]})
        upto = len(self.buffer.rstrip())
        if self.buffer[:upto].endswith("}"):
            upto -= 1  # may be the call's own closing brace: held until the end
        if upto > self.sent:
            deltas.append(self._arguments(self.buffer[self.sent:upto]))
            self.sent = upto
        return deltas

    def _arguments(self, piece: str) -> dict:
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

    def finish(self, finish: str | None) -> tuple[list[dict], str | None]:
        """The last deltas and the finish_reason."""
        if self.mode == "text":
            return [], finish
        if self.mode == "undecided":  # nothing but whitespace came
            return ([{"content": self.buffer}] if self.buffer else []), finish
        call = split_call(self.buffer)
        if call is None:  # cut short (length): what was held back goes out as it is
            rest = self.buffer[self.sent:] if self.head_end >= 0 else ""
            return ([self._arguments(rest)] if rest else []), finish
        _, arguments = call
        rest = arguments[self.sent - self.head_end:]
        return ([self._arguments(rest)] if rest else []), "tool_calls" if finish == "stop" else finish
