"""Tool calling in the course's own format, made reliable by constrained decoding. Shown in lesson 16.

SmolLM2's chat template has no tool section, so the course defines one (as every model family does):

* the tools are described in the system turn (`tools_system_prompt`): name, description, the JSON
  Schema of the arguments, and the one way to call them;
* a call is a tagged JSON block, the whole reply:
  `<tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>`;
* a tool's result comes back in the next turn as a user message `<tool_result name="...">...</tool_result>`
  (`render_messages` turns OpenAI's assistant `tool_calls` and `role: "tool"` messages into these turns).

`tool_call_grammar` compiles the tools into a grammar (utils.json_schema_grammar): the name is one of
the tools and the arguments validate against that tool's schema, whatever the model prefers. With
tool_choice "auto" the reply is either a call or plain text that does not start with "<".
`parse_tool_call` reads a call back from any text (also unconstrained output, to measure how often it
is valid), and `ToolCallStream` turns a reply that grows token by token into OpenAI's stream deltas.
"""

from __future__ import annotations

import json
import re

from utils.json_schema_grammar import MAX_STRING_CHARS, NFA, SchemaGrammar, is_any_char, is_not_angle

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN = "<tool_result"  # how a tool's result starts in the conversation (format_tool_result)
CALL_END = "}" + CALL_CLOSE  # what follows the arguments object
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
CALL_HEADER = re.compile(r'<tool_call>\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def format_tool_call(name: str, arguments: dict) -> str:
    """The text of one call. Example: ("add", {"a": 1}) -> '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'."""
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + CALL_CLOSE


def format_tool_result(name: str, content: str) -> str:
    """The text of a tool's result in the next user turn. Example: ("add", "3") -> '<tool_result name="add">3</tool_result>'."""
    return f'<tool_result name="{name}">{content}</tool_result>'


def parse_tool_call(text: str) -> dict | None:
    """The first call in `text` as {"name": str, "arguments": dict}, or None if there is no well-formed one.

    Lenient about where the block is (unconstrained models write text around it); strict about its
    content: JSON with a string "name" and an object "arguments". Schema checks: `call_problem`.
    Example: 'ok <tool_call>{"name": "f", "arguments": {}}</tool_call>' -> {"name": "f", "arguments": {}}.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    start = text.find(CALL_OPEN)
    if start < 0:
        return None
    try:  # the JSON decoder, not a search for "</tool_call>", finds the end: a string may contain that tag
        call, _ = json.JSONDecoder().raw_decode(text, start + len(CALL_OPEN))
    except ValueError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
        return None
    return {"name": call["name"], "arguments": call["arguments"]}


def call_problem(call: dict | None, tools: list[dict]) -> str | None:
    """What makes `call` (from parse_tool_call) an invalid call of one of `tools`, or None if it is valid.

    tools: OpenAI tool definitions [{"type": "function", "function": {"name", "parameters", ...}}].
    Example: call_problem(None, tools) -> "no well-formed tool call".
    """
    import jsonschema

    if call is None:
        return "no well-formed tool call"
    schemas = {t["function"]["name"]: t["function"].get("parameters", NO_ARGUMENTS) for t in tools}
    if call["name"] not in schemas:
        return f"unknown tool {call['name']!r}"
    try:
        jsonschema.validate(call["arguments"], schemas[call["name"]])
    except jsonschema.ValidationError as err:
        return f"arguments do not match the schema: {err.message}"
    return None


def tools_system_prompt(tools: list[dict], system: str = "") -> str:
    """The system turn that describes `tools` and the call format (after the caller's own system text)."""
    lines = [system.strip(), ""] if system.strip() else []
    lines.append("You can call these tools:")
    for tool in tools:
        fn = tool["function"]
        params = json.dumps(fn.get("parameters", NO_ARGUMENTS))
        lines.append(f"- {fn['name']}: {fn.get('description', '').strip()} Arguments (JSON Schema): {params}")
    lines += ["", "To call a tool, reply with only this line:",
              CALL_OPEN + '{"name": "<tool name>", "arguments": {<the arguments as JSON>}}' + CALL_CLOSE,
              "The result comes back as <tool_result>. If no tool is needed, answer in plain text."]
    return "\n".join(lines)


def render_messages(messages: list[dict], tools: list[dict] | None = None,
                    answer_schema: dict | None = None) -> list[dict]:
    """OpenAI messages (with assistant tool_calls and role "tool") -> plain role/content turns for the
    chat template. The tools, if any, are described in the system turn, and so is answer_schema (the
    JSON Schema of response_format), which the grammar enforces anyway."""
    names = {}  # tool_call_id -> name, to label the results
    turns = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
                calls.append(CALL_OPEN + '{"name": ' + json.dumps(c["function"]["name"]) + ', "arguments": '
                             + c["function"]["arguments"] + "}" + CALL_CLOSE)
            turns.append({"role": "assistant", "content": "\n".join(calls)})
        elif m["role"] == "tool":
            turns.append({"role": "user", "content": format_tool_result(
                names.get(m.get("tool_call_id"), "tool"), m["content"])})
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else None
    if tools:
        system = tools_system_prompt(tools, system or "")
    if answer_schema is not None:
        system = ((system or "") + "\n\nAnswer with JSON that follows this JSON Schema: "
                  + json.dumps(answer_schema)).strip()
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def tool_call_grammar(tokenizer, tools: list[dict], tool_choice="required", answer_schema: dict | None = None,
                      max_string_chars: int = MAX_STRING_CHARS):
    """A grammar for one reply: a call of one of `tools` (name from the list, arguments valid under its
    schema), or, with tool_choice "auto", also a plain answer (any text not starting with "<"; with
    answer_schema, JSON valid under it instead). tool_choice: "auto", "required" or a tool's name.

    max_string_chars: the longest string argument (utils.json_schema_grammar).
    Example: tool_call_grammar(tok, tools, "calculator") only allows calls of the calculator.
    Shown in lesson 16.
    """
    by_name = {t["function"]["name"]: t["function"].get("parameters", NO_ARGUMENTS) for t in tools}
    if tool_choice not in ("auto", "required") and tool_choice not in by_name:
        raise ValueError(f"tool_choice must be 'auto', 'required' or one of the tools {sorted(by_name)}, "
                         f"got {tool_choice!r}")
    chosen = by_name if tool_choice in ("auto", "required") else {tool_choice: by_name[tool_choice]}
    nfa = NFA()
    calls = nfa.alt([nfa.seq([nfa.literal(CALL_OPEN + '{"name": ' + json.dumps(name) + ', "arguments": '),
                              nfa.schema(schema, f"tools[{name}].parameters"), nfa.literal(CALL_END)])
                     for name, schema in chosen.items()])
    if tool_choice != "auto":
        return SchemaGrammar(tokenizer, nfa, calls, max_string_chars)
    if answer_schema is not None:
        answer = nfa.schema(answer_schema, "response_format.json_schema.schema")
    else:
        answer = nfa.seq([nfa.chars(is_not_angle, 1, 1), nfa.chars(is_any_char, 0, None)])
    return SchemaGrammar(tokenizer, nfa, nfa.alt([calls, answer]), max_string_chars)


def reply_message(text: str, call_id: str) -> tuple[dict, bool]:
    """A finished reply -> (OpenAI assistant message, whether it is a tool call)."""
    call = parse_tool_call(text) if text.startswith(CALL_OPEN) else None
    if call is None:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}, True


class ToolCallStream:
    """Turns a reply that grows piece by piece into OpenAI stream deltas (plain content or one tool call).

    While the reply could still become "<tool_call>" nothing is sent. A call is announced once its name
    is complete ({"tool_calls": [{"index": 0, "id", "type", "function": {"name", "arguments": ""}}]});
    then its arguments are sent as they grow ({"tool_calls": [{"index": 0, "function": {"arguments": ...}}]}),
    holding back what could be the closing '}</tool_call>'.
    """

    def __init__(self, call_id: str):
        self.call_id, self.text, self.sent = call_id, "", 0
        self.mode = "undecided"  # then "content" or "call"
        self.args_start = None   # where the arguments begin in self.text, once the header is complete

    def feed(self, piece: str, final: bool = False) -> list[dict]:
        self.text += piece
        deltas = []
        if self.mode == "undecided":
            if self.text.startswith(CALL_OPEN):
                self.mode = "call"
            elif not CALL_OPEN.startswith(self.text) or (final and self.text):
                self.mode = "content"
        if self.mode == "content":
            if self.sent < len(self.text):
                deltas.append({"content": self.text[self.sent:]})
                self.sent = len(self.text)
        elif self.mode == "call":
            if self.args_start is None and (header := CALL_HEADER.match(self.text)):
                self.args_start = self.sent = header.end()
                deltas.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                               "function": {"name": json.loads(header.group(1)), "arguments": ""}}]})
            if self.args_start is not None:
                end = len(self.text)
                if final and self.text.endswith(CALL_END):
                    end -= len(CALL_END)
                elif not final:  # hold back a possible start of '}</tool_call>'
                    end = max(self.sent, end - next((n for n in range(len(CALL_END), 0, -1)
                                                     if CALL_END.startswith(self.text[-n:])), 0))
                if end > self.sent:
                    deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": self.text[self.sent:end]}}]})
                    self.sent = end
        return deltas

    def is_call(self) -> bool:
        """Whether the finished reply is a complete, well-formed call."""
        return self.mode == "call" and self.args_start is not None and parse_tool_call(self.text) is not None
