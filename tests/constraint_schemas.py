"""JSON schemas for the constrained-output tests (no test functions here): one or more per feature, each
bounded (strings by maxLength, pattern or enum, arrays by maxItems, objects by additionalProperties false) so
that a random model's answer ends well within a few hundred tokens."""

from __future__ import annotations

_S = {"type": "string", "maxLength": 8}

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": _S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "address": {"type": "object", "properties": {
            "city": _S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"],
            "additionalProperties": False}}, "required": ["id", "address"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "enum mixed": {"enum": ["yes", "no", 1, None, True]},
    "const": {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -9,
              "maximum": 9}}, "required": ["kind", "x"], "additionalProperties": False},
    "integer range": {"type": "integer", "minimum": 10, "maximum": 20},
    "negative range": {"type": "integer", "minimum": -50, "maximum": -3},
    "number range": {"type": "number", "minimum": 0.5, "maximum": 2.5, "multipleOf": 0.25},
    "exclusive range": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
    "array bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2,
                     "maxItems": 4},
    "array of objects": {"type": "array", "items": {"type": "object", "properties": {"k": _S, "v": {"type": "boolean"}},
                         "required": ["k", "v"], "additionalProperties": False}, "minItems": 1, "maxItems": 2},
    "string pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                       "required": ["code"], "additionalProperties": False},
    "string lengths": {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 5}, "minItems": 1,
                       "maxItems": 3},
    "anyOf": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                                    {"type": "string", "maxLength": 4},
                                                                    {"type": "null"}]}},
              "required": ["value"], "additionalProperties": False},
    "oneOf objects": {"oneOf": [
        {"type": "object", "properties": {"circle": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["circle"], "additionalProperties": False},
        {"type": "object", "properties": {"square": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["square"], "additionalProperties": False}]},
    "$ref/$defs": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False},
    "optional properties": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5},
                                                             "b": _S, "c": {"type": "boolean"}},
                            "required": ["a"], "additionalProperties": False},
    "type list": {"type": "object", "properties": {"maybe": {"type": ["integer", "null"], "minimum": 0,
                                                             "maximum": 50}},
                  "required": ["maybe"], "additionalProperties": False},
    "boolean": {"type": "boolean"},
    "tuple": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}],
              "items": False, "minItems": 2},
    "format date": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                    "required": ["day"], "additionalProperties": False},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}},
                         "required": ["a"]},
                        {"properties": {"a": {"type": "integer"}}, "additionalProperties": False}]},
    "deep arrays": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 3},
                    "minItems": 1, "maxItems": 3},
}
