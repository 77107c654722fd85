"""A request's output constraint: OpenAI's response_format, tools, and the guided_* fields of vLLM (plus
llama.cpp's `grammar`), turned into one compiled pybitnet.constraints.Constraint.

    response_format {"type": "json_object"}                     any JSON object
    response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    guided_json (a schema, as an object or its JSON text)        guided_regex        guided_grammar (Lark, or GBNF)
    grammar (llama.cpp's GBNF)                                   tools + tool_choice (serve/tools.py)

A request gives at most one of them. Compiling runs in a worker thread and its result is cached per
canonical source (constraints.compile_constraint); a source that does not compile, or is too large, is an
error naming the field, raised before the request is queued.
"""

from __future__ import annotations

import logging

from ..constraints import ConstraintError, compile_constraint, prepare
from .tools import RequestError, ToolSetup


log = logging.getLogger("pybitnet.serve")


def prepare_quietly(tokenizer, vocab_size: int, stop_ids) -> None:
    """constraints.prepare at server start (in a thread of its own); a failure is logged, and the first
    constrained request meets it again."""
    try:
        prepare(tokenizer, vocab_size, stop_ids)
    except Exception as err:  # noqa: BLE001 - only a log line: requests without constraints are unaffected
        log.warning("constrained output is not ready: %s", err)


def requested(body, setup: ToolSetup | None) -> tuple[str, str, object] | None:
    """(field, constraint kind, source) of what the request asks its output to follow, or None."""
    found = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            found.append(("response_format", "json_schema", {"type": "object"}))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise RequestError('response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
                                   '"schema": {...}}', "response_format")
            schema = spec.get("schema", {})
            found.append(("response_format", "json_schema", schema))
        elif kind != "text":
            raise RequestError('response_format.type must be "text", "json_object" or "json_schema", '
                               f"got {kind!r}", "response_format")
    for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_grammar", "grammar"),
                       ("grammar", "grammar")):
        value = getattr(body, name, None)
        if value is not None:
            found.append((name, kind, value))
    if setup is not None and setup.constrained:
        kind, source = setup.grammar()
        found.append(("tools", kind, source))
    if len(found) > 1:
        raise RequestError(f"a request may constrain its output one way; got {', '.join(f for f, _, _ in found)}",
                           found[1][0])
    return found[0] if found else None


def compile_requested(wanted: tuple[str, str, object], tokenizer, vocab_size: int, stop_ids):
    """The compiled constraint of requested(...) (in a worker thread); RequestError naming the field if not."""
    field, kind, source = wanted
    if tokenizer is None:
        raise RequestError("constrained output needs a tokenizer; this model has none", field)
    try:
        return compile_constraint(kind, source, tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
    except ConstraintError as err:
        raise RequestError(f"{field}: {err}", field) from None
