"""Which constraint library: per-token mask time on a 128k vocabulary, compile time and JSON-schema coverage.

Candidates: llguidance, xgrammar and outlines-core, each on the synthetic byte-level BPE of the 2B-4T
vocabulary size (benchmarks/serve_load.synthetic_bpe, 128256 tokens with merges). For each library and a
10-property JSON schema: the time to compile the schema against the vocabulary, then the mean time of one
token mask over a forced walk through a valid document (the tokens of a fixed JSON text, fed one by one).
Coverage: how many of a list of schemas, one per JSON-schema feature, the library compiles and how many of
their valid example documents it accepts token by token. A library that is not installed is skipped.

    pip install llguidance xgrammar outlines-core
    python benchmarks/constraint_engines.py [--vocab 128256] [--json FILE]

The numbers that chose llguidance are in docs/constraints.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import synthetic_bpe  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "nickname": {"type": ["string", "null"]},
        "level": {"type": "integer"},
    },
    "required": ["name", "age", "email", "score", "active", "tags", "role", "address", "nickname", "level"],
    "additionalProperties": False,
}
DOCUMENT = ('{"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "score": 98.5, "active": true, '
            '"tags": ["math", "engines"], "role": "admin", "address": {"city": "London", "zip": "W1"}, '
            '"nickname": null, "level": 7}')

# one schema per feature, with a valid document for it
FEATURES = [
    ("enum", {"enum": ["a", "b", 3]}, '"b"'),
    ("const", {"const": "x"}, '"x"'),
    ("integer range", {"type": "integer", "minimum": -5, "maximum": 120}, "42"),
    ("exclusive range", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, "0.5"),
    ("string lengths", {"type": "string", "minLength": 2, "maxLength": 4}, '"abc"'),
    ("string pattern", {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, '"AB-123"'),
    ("format date-time", {"type": "string", "format": "date-time"}, '"2024-01-02T03:04:05Z"'),
    ("array items", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}, "[1, 2]"),
    ("tuple prefixItems", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                           "items": False}, '["a", 1]'),
    ("nested object", {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "integer"}}, "required": ["b"]}}, "required": ["a"]}, '{"a": {"b": 1}}'),
    ("optional properties", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                             "required": ["a"]}, '{"a": 1}'),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     '{"x": 1, "y": 2}'),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, '"s"'),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, "true"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}}]}, '{"a": 1}'),
    ("$ref/$defs", {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                    "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}, "required": ["p"]},
     '{"p": {"x": 1}}'),
    ("recursive $ref", {"$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"},
     '{"children": [{"children": []}]}'),
    ("type list", {"type": ["integer", "null"]}, "null"),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, "15"),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 2]"),
    ("minProperties", {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1},
     '{"a": 1}'),
    ("if/then/else", {"type": "object", "if": {"properties": {"a": {"const": 1}}},
                      "then": {"required": ["b"]}}, '{"a": 2}'),
]


class LLGuidance:
    name = "llguidance"

    def __init__(self, backend, vocab: int, eos: int):
        import llguidance
        import llguidance.torch  # noqa: F401
        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=eos)
        self.vocab = vocab
        import torch
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        self.torch = torch

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def mask(self, matcher):
        self.ll.torch.fill_next_token_bitmask(matcher, self.bitmask, 0)

    def allowed(self, matcher, token):
        self.mask(matcher)
        return bool((int(self.bitmask[0, token // 32]) >> (token % 32)) & 1)

    def accept(self, matcher, token) -> bool:
        return matcher.consume_token(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, backend, vocab: int, eos: int):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end_of_text|>")
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def mask(self, matcher):
        matcher.fill_next_token_bitmask(self.bitmask)

    def allowed(self, matcher, token):
        self.mask(matcher)
        return bool((int(self.bitmask[0, token // 32]) >> (token % 32)) & 1)

    def accept(self, matcher, token) -> bool:
        return matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, backend, vocab: int, eos: int):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.oc, self.build = outlines_core, build_regex_from_schema
        tokens: dict[str, list[int]] = {}
        for token, i in backend.get_vocab().items():
            if i != eos:
                tokens.setdefault(token, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema):
        return self.oc.Guide(self.oc.Index(self.build(json.dumps(schema)), self.vocabulary))

    def mask(self, guide):
        guide.get_tokens()

    def allowed(self, guide, token):
        return token in set(guide.get_tokens())

    def accept(self, guide, token) -> bool:
        try:
            guide.advance(token)
            return True
        except Exception:
            return False


def measure(cls, backend, vocab: int, eos: int) -> dict:
    start = time.perf_counter()
    lib = cls(backend, vocab, eos)
    out = {"library": cls.name, "tokenizer_s": time.perf_counter() - start}
    start = time.perf_counter()
    matcher = lib.compile(SCHEMA)
    out["compile_10_properties_s"] = time.perf_counter() - start
    times = []
    for token in backend.encode(DOCUMENT).ids:
        start = time.perf_counter()
        lib.mask(matcher)
        times.append(time.perf_counter() - start)
        if not lib.accept(matcher, token):
            out["walk_error"] = f"refused token {token} of the valid document"
            break
    out["mask_ms_mean"] = 1e3 * statistics.fmean(times)
    out["mask_ms_p99"] = 1e3 * sorted(times)[int(0.99 * (len(times) - 1))]
    compiled = accepted = 0
    failures = []
    for feature, schema, doc in FEATURES:
        try:
            m = lib.compile(schema)
        except Exception as err:  # noqa: BLE001 - any refusal counts as not covered
            failures.append(f"{feature}: {type(err).__name__}: {str(err)[:80]}")
            continue
        compiled += 1
        if all(lib.accept(m, t) for t in backend.encode(doc).ids):
            accepted += 1
        else:
            failures.append(f"{feature}: refused its valid document")
    out.update(features=len(FEATURES), compiled=compiled, accepted=accepted, failures=failures)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    backend = synthetic_bpe(args.vocab)
    eos = backend.token_to_id("<|end_of_text|>")
    results = []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            result = measure(cls, backend, args.vocab, eos)
        except ImportError as err:
            print(f"{cls.name}: not installed ({err})")
            continue
        results.append(result)
        print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
