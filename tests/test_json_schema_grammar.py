"""utils.json_schema_grammar: every supported keyword is enforced, every other keyword is refused.

Each keyword is checked two ways: texts the schema accepts / rejects (the automaton agrees with the
`jsonschema` library on hand-written cases), and generation by tiny *random* Llamas under the grammar
(a random model prefers arbitrary tokens, so only the grammar keeps the output valid): every output
parses and `jsonschema.validate` passes.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.standin import random_llama, tiny_tokenizer
from utils.generation import generate_batch
from utils.json_schema_grammar import (
    DONE,
    MAX_INT_RANGE,
    NFA,
    json_schema_grammar,
    json_type_of,
)
from utils.prompting import chat_prompt


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def obj(props: dict, required=None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


# (schema, texts it must accept, texts it must reject): each keyword on its own
CASES = {
    "string": ({"type": "string"}, ['"Oslo"', '""', '"a b-c"'], ['Oslo', '"a"b"', '"\\n"', '1']),
    "integer": ({"type": "integer"}, ["0", "42", "-7"], ["07", "1.5", "-", '"1"', "1" + "0" * 20]),
    "number": ({"type": "number"}, ["0", "-3.25", "12", "0.5"], ["1.", ".5", "1e3", "01"]),
    "boolean": ({"type": "boolean"}, ["true", "false"], ["True", "1", "null"]),
    "null": ({"type": "null"}, ["null"], ["None", '"null"']),
    "type list": ({"type": ["integer", "null"]}, ["3", "null"], ['"3"', "true"]),
    "enum": ({"enum": ["celsius", "fahrenheit", 3, None]}, ['"celsius"', "3", "null"], ['"kelvin"', "4"]),
    "typed enum": ({"type": "string", "enum": ["a", "ab"]}, ['"a"', '"ab"'], ['"b"', '"abc"']),
    "const": ({"const": {"k": [1, 2]}}, ['{"k": [1, 2]}'], ['{"k": [1]}', '{"k": [2, 1]}']),
    "required + optional": (obj({"a": {"type": "integer"}, "b": {"type": "string"}}, required=["b"]),
                            ['{"b": "x"}', '{"a": 1, "b": "x"}'], ['{"a": 1}', '{}', '{"b": "x", "a": 1}']),
    "all optional": (obj({"a": {"type": "integer"}, "b": {"type": "integer"}}, required=[]),
                     ['{}', '{"a": 1}', '{"b": 2}', '{"a": 1, "b": 2}'], ['{, "b": 2}', '{"a": 1,}']),
    "additionalProperties false": (obj({"a": {"type": "integer"}}), ['{"a": 1}'], ['{"a": 1, "z": 2}']),
    "nested objects": (obj({"user": obj({"name": {"type": "string"}, "age": {"type": "integer"}})}),
                       ['{"user": {"name": "Ada", "age": 36}}'], ['{"user": {"name": "Ada"}}', '{"user": 1}']),
    "array items": ({"type": "array", "items": {"type": "integer"}}, ["[]", "[1]", "[1, 2, 3]"],
                    ["[1,2]", "[1, ]", '["a"]', "[1, 2"]),
    "minItems/maxItems": ({"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
                          ["[true, false]", "[true, true, false]"], ["[]", "[true]", "[true, true, true, true]"]),
    "maxItems 0": ({"type": "array", "items": {"type": "integer"}, "maxItems": 0}, ["[]"], ["[1]"]),
    "minimum/maximum": ({"type": "integer", "minimum": -2, "maximum": 12}, ["-2", "0", "12"], ["-3", "13", "120"]),
    "minimum 0 alone": ({"type": "integer", "minimum": 0}, ["0", "5", "123"], ["-1", "-0"]),
    "minimum 1 alone": ({"type": "integer", "minimum": 1}, ["1", "90"], ["0", "-1"]),
    "annotations": ({"type": "string", "title": "T", "description": "d", "default": "x", "examples": ["y"]},
                    ['"z"'], ["1"]),
}


@pytest.mark.parametrize("name", CASES)
def test_each_keyword_accepts_and_rejects_like_jsonschema(tok, name):
    schema, good, bad = CASES[name]
    grammar = json_schema_grammar(tok, schema)
    for text in good:
        jsonschema.validate(json.loads(text), schema)  # the case itself is right
        assert grammar.accepts_text(text), (name, text)
    for text in bad:
        assert not grammar.accepts_text(text), (name, text)


TOOL_LIKE = obj({
    "city": {"type": "string", "description": "a city"},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
    "where": obj({"lat": {"type": "number"}, "lon": {"type": "number"}}),
    "alerts": {"type": "boolean"},
    "note": {"type": ["string", "null"]},
}, required=["city", "unit", "where"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_models_write_valid_json_under_the_grammar(tok, seed):
    model = random_llama(tok, seed)
    prompts = [chat_prompt(tok, f"Weather request {i}. JSON:") for i in range(4)]
    free = generate_batch(model, tok, prompts, max_new_tokens=60, batch_size=4)
    assert not any(text.startswith("{") for text in free)  # left alone, a random model writes anything
    replies = generate_batch(model, tok, prompts, max_new_tokens=400, batch_size=4,
                             grammar=json_schema_grammar(tok, TOOL_LIKE, max_string_chars=20))
    for reply in replies:
        value = json.loads(reply)
        jsonschema.validate(value, TOOL_LIKE)
        assert all(len(v) <= 20 for v in (value["city"], value.get("note") or ""))


def test_grammar_state_machine_by_hand(tok):
    grammar = json_schema_grammar(tok, obj({"n": {"type": "integer"}}))
    state = grammar.start()
    assert grammar.allowed(state).nonzero().flatten().tolist() == tok.encode("{", add_special_tokens=False)
    for ch in '{"n": 4':
        state = grammar.advance(state, tok.encode(ch, add_special_tokens=False)[0])
    assert not grammar.allowed(state)[tok.eos_token_id]  # the object is not closed yet
    allowed = {tok.decode([i]) for i in grammar.allowed(state).nonzero().flatten().tolist()}
    assert allowed == set("0123456789}")
    state = grammar.advance(state, tok.encode("}", add_special_tokens=False)[0])
    assert grammar.allowed(state).nonzero().flatten().tolist() == [tok.eos_token_id]
    assert grammar.advance(state, tok.eos_token_id) == DONE and grammar.done(DONE)
    with pytest.raises(ValueError, match="not allowed"):
        grammar.advance(grammar.start(), tok.encode("x", add_special_tokens=False)[0])


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "string", "pattern": "^a"}, "pattern"),
    ({"type": "string", "format": "date"}, "format"),
    ({"type": "string", "minLength": 2}, "minLength"),
    ({"type": "string", "maxLength": 2}, "maxLength"),
    ({"anyOf": [{"type": "string"}]}, "anyOf"),
    ({"oneOf": [{"type": "string"}]}, "oneOf"),
    ({"allOf": [{"type": "string"}]}, "allOf"),
    ({"$ref": "#/definitions/x"}, "$ref"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"type": "integer", "exclusiveMinimum": 0}, "exclusiveMinimum"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "patternProperties": {}}, "patternProperties"),
    (obj({"a": {"type": "string", "pattern": "x"}}), "pattern"),  # found inside a nested schema too
])
def test_unsupported_keywords_are_refused_by_name(schema, keyword):
    with pytest.raises(ValueError, match=re.escape(f"'{keyword}'")) as err:
        NFA().schema(schema)
    assert "not supported" in str(err.value)


@pytest.mark.parametrize("schema, words", [
    ({"type": "date"}, "type"),
    ({}, "needs a 'type'"),
    ({"type": "array"}, "needs 'items'"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 2}, "above maxItems"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 1000}, "maxItems"),
    ({"type": "integer", "minimum": 0, "maximum": MAX_INT_RANGE * 10}, "spells out"),
    ({"type": "integer", "maximum": 5}, "minimum 0 or 1 alone"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "above maximum"),
    ({"type": "number", "minimum": 0}, "integers only"),
    ({"type": "string", "enum": ["a", 1]}, "not of the schema's type"),
    ({"enum": []}, "non-empty list"),
    (obj({"a": {"type": "integer"}}, required=["b"]), "required"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "only true or false"),
    ({"type": "string", "items": {"type": "integer"}}, "apply to arrays"),
])
def test_malformed_schemas_are_refused_with_a_reason(schema, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        NFA().schema(schema)
    with pytest.raises(TypeError):
        NFA().schema(["not", "a", "schema"])


def test_json_type_of():
    assert [json_type_of(v) for v in (None, True, 3, 3.5, "s", [], {})] == \
        ["null", "boolean", "integer", "number", "string", "array", "object"]
