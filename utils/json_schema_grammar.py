"""JSON Schema -> a grammar for constrained decoding: output that validates by construction. Shown in lesson 16.

Lesson 07's `utils.constrained.Grammar` is a fixed sequence of segments: enough for a flat object with
known keys. Tool arguments and structured outputs need more: optional keys, arrays of any length,
nested objects, enums, number ranges. This module compiles such a schema in three steps:

1. **Schema -> character automaton.** `NFA.schema(schema)` builds a nondeterministic automaton over
   characters, Thompson style (the construction regular-expression engines use): every JSON value is a
   fragment (start node, end node) joined by character edges and empty edges. The JSON is written the
   way `json.dumps` writes it (", " and ": " separators, keys in the schema's order), so there is one
   text per value and no optional whitespace to model.
2. **Characters -> states.** The set of nodes the automaton can be in after a text is its *state*;
   `NFA.step(state, char)` computes the next one lazily and remembers it (a lazily built DFA).
3. **States -> token masks.** A token is allowed when the automaton can read its whole text. Walking
   the vocabulary as a trie (tokens sharing a first character share the first step) gives the mask of
   a state in one pass; `SchemaGrammar` (in utils.constrained, beside lesson 07's Grammar) keeps one
   mask per state, so later steps cost a dict lookup.

`SchemaGrammar` has lesson 07's grammar interface (start / allowed / advance / done), so
`utils.generation.generate_batch(..., grammar=...)` and the course server use it unchanged.

Supported: type (object, string, integer, number, boolean, array, null, or a list of them), enum,
const, properties, required, additionalProperties (true/false; extra keys are never generated),
items, minItems, maxItems, minimum/maximum on integers (a range of at most MAX_INT_RANGE values, or
minimum 0 or 1 alone), and annotations (title, description, default, examples, $schema, $comment).
Anything else (pattern, anyOf, $ref, format, minLength, ...) is refused with a ValueError naming the
keyword: a constraint the decoder cannot enforce must not be silently dropped.
Strings are printable ASCII without quote or backslash (what json.dumps writes unescaped), at most
max_string_chars long; numbers have at most MAX_DIGITS digits before the point and MAX_FRACTION_DIGITS
after it. These bounds make every output end: a model cannot ramble inside a value until max_tokens.
"""

from __future__ import annotations

import json

from utils.checks import check_positive_int
from utils.constrained import DONE, SchemaGrammar, TokenTrie, token_trie  # noqa: F401  (re-exported)

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$comment", "$id"}
KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties", "items",
            "minItems", "maxItems", "minimum", "maximum"}
TYPES = ("object", "string", "integer", "number", "boolean", "array", "null")
MAX_DIGITS = 12           # digits of an integer (or of a number before its point): the model cannot ramble
MAX_FRACTION_DIGITS = 6   # digits after a number's point
MAX_INT_RANGE = 10_000    # an integer range [minimum, maximum] is spelled out value by value up to this size
MAX_UNROLLED_ITEMS = 32   # minItems / maxItems are unrolled into copies of the item automaton
MAX_DEPTH = 10            # nesting of objects and arrays
MAX_NODES = 200_000       # automaton size: a schema that needs more is refused
MAX_STRING_CHARS = 200    # characters in one string value (the default of json_schema_grammar)


def is_string_char(ch: str) -> bool:
    """A character json.dumps writes unescaped inside a string. Example: "a" -> True, '"' -> False."""
    return " " <= ch <= "~" and ch not in '"\\'


def is_digit(ch: str) -> bool:
    return "0" <= ch <= "9"


def is_nonzero_digit(ch: str) -> bool:
    return "1" <= ch <= "9"


def is_any_char(ch: str) -> bool:
    return True


def is_not_angle(ch: str) -> bool:
    return ch != "<"


def json_type_of(value) -> str:
    """The JSON type of a Python value. Example: 3 -> "integer", 3.5 -> "number", None -> "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "unsupported")


class NFA:
    """A character automaton. Fragments are (start node, end node) pairs; the builders return new ones.

    edges[n]: list of (test, target), test a one-character string or a function char -> bool;
    empty[n]: targets reached without reading a character. Node `self.accept` ends the text.
    """

    def __init__(self):
        self.edges: list[list[tuple]] = []
        self.empty: list[list[int]] = []
        self.accept = -1
        self.string_nodes: set[int] = set()  # the self-looping nodes inside string values
        self.string_states: dict[int, bool] = {}  # state -> whether it is inside a string (in_string)
        self.state_sets: list[frozenset] = []   # state id -> the set of nodes it stands for
        self.state_ids: dict[frozenset, int] = {}
        self.steps: dict[tuple[int, str], int] = {}  # (state, char) -> next state; -1: no way on

    # -- building ---------------------------------------------------------------------------------
    def node(self) -> int:
        if len(self.edges) >= MAX_NODES:
            raise ValueError(f"the schema needs an automaton of more than {MAX_NODES} nodes; simplify it "
                             "(fewer unrolled items, smaller integer ranges, less nesting)")
        self.edges.append([])
        self.empty.append([])
        return len(self.edges) - 1

    def link(self, a: int, b: int) -> None:
        self.empty[a].append(b)

    def literal(self, text: str) -> tuple[int, int]:
        """Exactly `text`. Example: literal("null")."""
        start = end = self.node()
        for ch in text:
            nxt = self.node()
            self.edges[end].append((ch, nxt))
            end = nxt
        return start, end

    def chars(self, test, at_least: int, at_most: int | None) -> tuple[int, int]:
        """Between at_least and at_most characters passing `test` (at_most None: no limit)."""
        start = end = self.node()
        for _ in range(at_least):
            nxt = self.node()
            self.edges[end].append((test, nxt))
            end = nxt
        if at_most is None:
            self.edges[end].append((test, end))  # a self-loop: one state for any length
            return start, end
        last = self.node()
        for _ in range(at_most - at_least):
            nxt = self.node()
            self.edges[end].append((test, nxt))
            self.link(end, last)
            end = nxt
        self.link(end, last)
        return start, last

    def words(self, options) -> tuple[int, int]:
        """Exactly one of the strings `options`, as a trie (shared prefixes are read once)."""
        start, end = self.node(), self.node()
        for word in options:
            at = start
            for ch in word:
                nxt = next((t for test, t in self.edges[at] if test == ch), None)
                if nxt is None:
                    nxt = self.node()
                    self.edges[at].append((ch, nxt))
                at = nxt
            self.link(at, end)
        return start, end

    def seq(self, fragments) -> tuple[int, int]:
        fragments = list(fragments)
        for (_, end), (start, _) in zip(fragments, fragments[1:]):
            self.link(end, start)
        return fragments[0][0], fragments[-1][1]

    def alt(self, fragments) -> tuple[int, int]:
        start, end = self.node(), self.node()
        for s, e in fragments:
            self.link(start, s)
            self.link(e, end)
        return start, end

    def optional(self, fragment) -> tuple[int, int]:
        self.link(fragment[0], fragment[1])
        return fragment

    def finish(self, fragment) -> None:
        """Make `fragment` the whole text: its end is the accepting node."""
        self.accept = fragment[1]

    # -- JSON values ------------------------------------------------------------------------------
    def schema(self, schema, where: str = "schema", depth: int = 0) -> tuple[int, int]:
        """The fragment of every JSON text (written as json.dumps writes it) that `schema` accepts."""
        if not isinstance(schema, dict):
            raise TypeError(f"{where} must be a JSON Schema object (a dict), got {type(schema).__name__}")
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: objects and arrays nested deeper than {MAX_DEPTH} levels are not supported")
        for key in schema:
            if key not in KEYWORDS and key not in ANNOTATIONS:
                raise ValueError(f"{where}: the JSON Schema keyword {key!r} is not supported by this "
                                 f"compiler (supported: {', '.join(sorted(KEYWORDS))})")
        types = schema.get("type")
        types = [types] if isinstance(types, str) else types
        if types is not None and (not isinstance(types, list) or not types
                                  or any(t not in TYPES for t in types)):
            raise ValueError(f"{where}.type: expected one of {', '.join(TYPES)} or a list of them, got {types!r}")
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}.enum: expected a non-empty list of values, got {values!r}")
            for v in values:
                kind = json_type_of(v)
                if types is not None and kind not in types and not (kind == "integer" and "number" in types):
                    raise ValueError(f"{where}: the value {v!r} ({kind}) is not of the schema's type {types}")
            texts = []
            for v in values:
                try:
                    texts.append(json.dumps(v))
                except (TypeError, ValueError):
                    raise ValueError(f"{where}.enum: {v!r} is not a JSON value") from None
            return self.words(dict.fromkeys(texts))
        if types is None:
            raise ValueError(f"{where}: a schema needs a 'type', 'enum' or 'const' to be generated")
        bounded = {"minimum", "maximum"} & schema.keys()
        if bounded and types != ["integer"]:
            raise ValueError(f"{where}: 'minimum'/'maximum' are supported on integers only")
        array_only = {"items", "minItems", "maxItems"} & schema.keys()
        if array_only and "array" not in types:
            raise ValueError(f"{where}: {sorted(array_only)} apply to arrays, but type is {types}")
        return self.alt([self.value(t, schema, where, depth) for t in types])

    def value(self, kind: str, schema: dict, where: str, depth: int) -> tuple[int, int]:
        if kind == "null":
            return self.literal("null")
        if kind == "boolean":
            return self.words(["true", "false"])
        if kind == "string":
            inside = self.chars(is_string_char, 0, None)
            self.string_nodes.add(inside[0])  # its length is bounded by SchemaGrammar, not by unrolling
            return self.seq([self.literal('"'), inside, self.literal('"')])
        if kind == "integer":
            return self.integer(schema, where)
        if kind == "number":
            whole = self.alt([self.literal("0"), self.seq([self.chars(is_nonzero_digit, 1, 1),
                                                             self.chars(is_digit, 0, MAX_DIGITS - 1)])])
            fraction = self.optional(self.seq([self.literal("."), self.chars(is_digit, 1, MAX_FRACTION_DIGITS)]))
            return self.seq([self.optional(self.literal("-")), whole, fraction])
        if kind == "array":
            return self.array(schema, where, depth)
        return self.object(schema, where, depth)

    def integer(self, schema: dict, where: str) -> tuple[int, int]:
        low, high = schema.get("minimum"), schema.get("maximum")
        for name, bound in (("minimum", low), ("maximum", high)):
            if bound is not None and json_type_of(bound) != "integer":
                raise ValueError(f"{where}.{name}: expected an integer, got {bound!r}")
        if low is not None and high is not None:
            if low > high:
                raise ValueError(f"{where}: minimum {low} is above maximum {high}")
            if high - low >= MAX_INT_RANGE:
                raise ValueError(f"{where}: minimum/maximum span {high - low + 1} integers; this compiler "
                                 f"spells out ranges of at most {MAX_INT_RANGE}")
            return self.words(str(i) for i in range(low, high + 1))
        if high is not None or (low is not None and low not in (0, 1)):
            raise ValueError(f"{where}: 'minimum'/'maximum' on integers are supported as a range with both "
                             f"bounds (at most {MAX_INT_RANGE} values) or as minimum 0 or 1 alone")
        positive = self.seq([self.chars(is_nonzero_digit, 1, 1), self.chars(is_digit, 0, MAX_DIGITS - 1)])
        if low == 1:
            return positive
        natural = self.alt([self.literal("0"), positive])
        return natural if low == 0 else self.seq([self.optional(self.literal("-")), natural])

    def array(self, schema: dict, where: str, depth: int) -> tuple[int, int]:
        if "items" not in schema:
            raise ValueError(f"{where}: an array schema needs 'items' (the schema of its elements)")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        for name, n in (("minItems", low), ("maxItems", high)):
            if n is not None and (json_type_of(n) != "integer" or not 0 <= n <= MAX_UNROLLED_ITEMS):
                raise ValueError(f"{where}.{name}: expected an integer in [0, {MAX_UNROLLED_ITEMS}], got {n!r}")
        if high is not None and high < low:
            raise ValueError(f"{where}: minItems {low} is above maxItems {high}")
        self.schema(schema["items"], where + ".items", depth + 1)  # checks the item schema even if never used
        if high == 0:
            return self.literal("[]")

        def item(sep: str):
            return self.seq([self.literal(sep), self.schema(schema["items"], where + ".items", depth + 1)])

        parts = [self.literal("["), item("")]
        parts += [item(", ") for _ in range(max(low - 1, 0))]
        if high is None:  # any number of further items: one copy, looped
            more = item(", ")
            self.link(more[1], more[0])
            parts.append(self.optional(more))
        else:  # up to high - max(low, 1) further items, each optional only if the one before is there
            tail = None
            for _ in range(high - max(low, 1)):
                tail = self.optional(item(", ") if tail is None else self.seq([item(", "), tail]))
            if tail is not None:
                parts.append(tail)
        parts.append(self.literal("]"))
        body = self.seq(parts)
        return self.alt([body, self.literal("[]")]) if low == 0 else body

    def object(self, schema: dict, where: str, depth: int) -> tuple[int, int]:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict) or not all(isinstance(k, str) for k in props):
            raise ValueError(f"{where}.properties: expected an object of name -> schema")
        if not isinstance(required, list) or not all(isinstance(r, str) and r in props for r in required):
            raise ValueError(f"{where}.required: expected a list of names from 'properties' "
                             f"({sorted(props)}), got {required!r}")
        if not isinstance(extra, bool):
            raise ValueError(f"{where}.additionalProperties: only true or false is supported (extra keys "
                             "are never generated), not a schema")
        # Two chains of nodes: before[i] = "at property i, nothing written yet", after[i] = "at property i,
        # something written" (the next key needs a ", " first). An optional property may be skipped.
        n = len(props)
        before = [self.node() for _ in range(n + 1)]
        after = [self.node() for _ in range(n + 1)]
        start, end = self.literal("{")
        self.link(end, before[0])
        for i, (name, sub) in enumerate(props.items()):
            key = json.dumps(name) + ": "
            for here, sep in ((before[i], ""), (after[i], ", ")):
                s, e = self.seq([self.literal(sep + key), self.schema(sub, f"{where}.properties.{name}", depth + 1)])
                self.link(here, s)
                self.link(e, after[i + 1])
            if name not in required:
                self.link(before[i], before[i + 1])
                self.link(after[i], after[i + 1])
        close = self.literal("}")
        self.link(before[n], close[0])
        self.link(after[n], close[0])
        return start, close[1]

    # -- reading ----------------------------------------------------------------------------------
    def state_of(self, nodes) -> int:
        """The id of the state {nodes and everything reachable from them by empty edges}."""
        todo, seen = list(nodes), set(nodes)
        while todo:
            for nxt in self.empty[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        key = frozenset(seen)
        if key not in self.state_ids:
            self.state_ids[key] = len(self.state_sets)
            self.state_sets.append(key)
        return self.state_ids[key]

    def step(self, state: int, ch: str) -> int:
        """The state after reading `ch`, or -1 if the text cannot go on with it."""
        key = (state, ch)
        nxt = self.steps.get(key)
        if nxt is None:
            targets = [t for n in self.state_sets[state] for test, t in self.edges[n]
                       if (test == ch if isinstance(test, str) else test(ch))]
            nxt = self.state_of(targets) if targets else -1
            self.steps[key] = nxt
        return nxt

    def read(self, state: int, text: str) -> int:
        """The state after reading `text` (-1 if it is not allowed). Example: read(start, '{"a": ')."""
        for ch in text:
            state = self.step(state, ch)
            if state < 0:
                return -1
        return state

    def accepts(self, state: int) -> bool:
        return state >= 0 and self.accept in self.state_sets[state]

    def in_string(self, state: int) -> bool:
        """Whether `state` is inside a string value (holds one of its self-looping nodes)."""
        if state not in self.string_states:
            self.string_states[state] = state >= 0 and not self.string_nodes.isdisjoint(self.state_sets[state])
        return self.string_states[state]


def json_schema_grammar(tokenizer, schema: dict, max_string_chars: int = MAX_STRING_CHARS) -> SchemaGrammar:
    """A grammar whose outputs are JSON texts valid under `schema` (the subset in this module's doc).

    Example: json_schema_grammar(tok, {"type": "object", "properties": {"n": {"type": "integer"}},
             "required": ["n"], "additionalProperties": False}) allows '{"n": 42}', nothing else shaped.
    Shown in lesson 16.
    """
    check_positive_int("max_string_chars", max_string_chars)
    nfa = NFA()
    return SchemaGrammar(tokenizer, nfa, nfa.schema(schema), max_string_chars)
