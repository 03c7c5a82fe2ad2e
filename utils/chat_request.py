"""What POST /v1/chat/completions accepts: the body's shape, the limits, the value checks (lesson 11).

`utils.serving` answers a request only after it passes two gates, both here:
1. its *shape*: `ChatCompletionRequest`, a pydantic model with strict types (`"temperature": "0.5"`,
   `"max_tokens": 1.5`, `"stream": "yes"` are refused, not converted); unknown fields are ignored,
   as OpenAI's API does for fields it does not use;
2. its *values*: `validate_request` checks ranges and sizes against the limits below, cheaply,
   before anything is tokenised, and returns the settings to generate with.
A refusal is an `APIError`: an HTTP status (400, 404) and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`, whose message says what is allowed.

Tool calling (lesson 16): `tools` (function definitions whose `parameters` JSON Schema the course's
compiler must support), `tool_choice`, assistant messages with `tool_calls`, `role: "tool"` results and
`response_format` are checked here too (`check_tools`, `check_tool_choice`, `check_response_format`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from utils.checks import check_number
from utils.json_schema_grammar import NFA

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]

# Limits: each one bounds the memory or CPU time one request can take before the model runs.
MAX_BODY_BYTES = 1 << 20      # 1 MiB of JSON: far more than SmolLM2's 8,192-token context can use
MAX_MESSAGES = 256            # messages in one conversation
MAX_CONTENT_CHARS = 100_000   # characters in one message (~25k tokens of English, 3x the context)
MAX_STOP_SEQUENCES = 4        # as OpenAI
MAX_STOP_CHARS = 256          # per stop string: each decoding step compares the text's tail to each one
MAX_SEED = 2**63 - 1          # torch.Generator.manual_seed takes a 64-bit integer
MAX_TOOLS = 64                # tools in one request (each one is compiled into the grammar)
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI allows as a function name


# ----------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error the API reports to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def param_name(loc) -> str | None:
    """pydantic's error location -> OpenAI's parameter name.

    Example: ("body", "messages", 0, "role") -> "messages[0].role"; ("body",) -> None.
    """
    name = ""
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or None


# ----------------------------------------------------------------------------------------------
# The request: its shape (pydantic, strict types), then its values (validate_request)


class Message(BaseModel):
    model_config = ConfigDict(strict=True)  # other keys (name, ...) are ignored
    role: str
    content: Any = None  # a string, null, or a list of text parts: checked in validate_request
    tool_calls: Any = None  # assistant messages: the calls it made (checked in check_message_calls)
    tool_call_id: Any = None  # "tool" messages: which call this is the result of


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions (the parameters this server uses; others are ignored)."""

    model_config = ConfigDict(strict=True)  # "0.5" is not a number, 1.5 is not a number of tokens
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: Any = None  # a string or a list of strings: checked in validate_request
    tools: Any = None  # [{"type": "function", "function": {...}}]: checked in check_tools
    tool_choice: Any = None  # "none", "auto", "required" or {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None  # accepted; this server makes at most one call per reply
    response_format: Any = None  # {"type": "text"} or {"type": "json_schema", "json_schema": {...}}


def message_text(content, param: str) -> str:
    """A message's content as one string. Example: [{"type": "text", "text": "Hi"}] -> "Hi"."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise APIError(400, f"Invalid '{param}': expected a string or a list of text parts "
                   '[{"type": "text", "text": "..."}] (this model reads text only).', param, "invalid_type")


def stop_strings(stop) -> list[str]:
    """`stop` as a list. Example: "\\n" -> ["\\n"]; None -> []; ["a", ""] -> APIError (empty string)."""
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOP_SEQUENCES
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise APIError(400, f"Invalid 'stop': expected a string or a list of at most {MAX_STOP_SEQUENCES} "
                       f"strings, each 1 to {MAX_STOP_CHARS} characters long.", "stop", "invalid_value")
    return stops


def checked_number(param: str, value, **bounds) -> float:
    """utils.checks.check_number, with its ValueError (NaN, out of range) as a 400 naming `param`."""
    try:
        return check_number(param, value, **bounds)
    except ValueError as err:
        raise APIError(400, f"Invalid '{param}': {err}.", param, "invalid_value") from None


def checked_int(param: str, value: int, low: int, high: int, what: str = "") -> int:
    """An int in [low, high] (pydantic has checked the type), else a 400 that says the allowed range."""
    if not low <= value <= high:
        code = "integer_below_min_value" if value < low else "integer_above_max_value"
        raise APIError(400, f"Invalid '{param}': expected an integer in [{low}, {high}]{what}, but got "
                       f"{value} instead.", param, code)
    return value


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"Invalid '{param}': {message}", param, code)


def check_schema(schema, param: str) -> dict:
    """A JSON Schema the course's compiler supports (utils.json_schema_grammar), else a 400 naming the keyword."""
    if not isinstance(schema, dict):
        raise bad(param, "expected a JSON Schema object.", "invalid_type")
    try:
        NFA().schema(schema, param)  # builds the automaton: every keyword is checked
    except (ValueError, TypeError) as err:
        raise bad(param, f"{err}.", "invalid_schema") from None
    return schema


def check_tools(tools) -> list[dict]:
    """`tools` -> a list of {"type": "function", "function": {"name", "description", "parameters"}}, or a 400."""
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise bad("tools", f"expected an array of 1 to {MAX_TOOLS} tool definitions.", "invalid_type")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad(where, 'expected {"type": "function", "function": {"name": ..., "parameters": ...}}.')
        fn = tool["function"]
        name, description = fn.get("name"), fn.get("description", "")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise bad(f"{where}.function.name", "expected 1 to 64 letters, digits, underscores or dashes.")
        if name in names:
            raise bad(f"{where}.function.name", f"the tool name {name!r} appears twice.")
        if not isinstance(description, str) or len(description) > MAX_CONTENT_CHARS:
            raise bad(f"{where}.function.description", f"expected a string of at most {MAX_CONTENT_CHARS} characters.")
        parameters = fn.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise bad(f"{where}.function.parameters", 'expected a JSON Schema with "type": "object".')
        names.add(name)
        checked.append({"type": "function", "function": {
            "name": name, "description": description,
            "parameters": check_schema(parameters, f"{where}.function.parameters")}})
    return checked


def check_tool_choice(tool_choice, tools: list[dict] | None) -> str:
    """`tool_choice` -> "none", "auto", "required" or the name of one tool, or a 400."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if tools is None and tool_choice != "none":
        raise bad("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
    if tool_choice in ("none", "auto", "required"):
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)):
        raise bad("tool_choice", "expected 'none', 'auto', 'required' or "
                  '{"type": "function", "function": {"name": ...}}.')
    if fn["name"] not in {t["function"]["name"] for t in tools}:
        raise bad("tool_choice", f"the function {fn['name'][:64]!r} is not one of the 'tools'.", "unknown_tool")
    return fn["name"]


def check_response_format(response_format) -> dict | None:
    """`response_format` -> the JSON Schema the answer must follow, or None for plain text; else a 400."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or "schema" not in spec:
            raise bad("response_format.json_schema", 'expected {"name": ..., "schema": {...}}.')
        return check_schema(spec["schema"], "response_format.json_schema.schema")
    raise bad("response_format.type", f"{kind!r} is not supported: use 'text' or 'json_schema' "
              "(this server has no grammar for free-form 'json_object').", "unsupported_value")


def check_message_calls(m, i: int) -> dict:
    """The tool-calling parts of message i: assistant `tool_calls`, a tool message's `tool_call_id`."""
    extra = {}
    if m.tool_calls is not None:
        calls = m.tool_calls
        ok = m.role == "assistant" and isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str) and isinstance(c["function"].get("arguments"), str)
            for c in calls)
        if not ok:
            raise bad(f"messages[{i}].tool_calls", "expected, on an assistant message, a list of "
                      '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "<JSON>"}}.')
        for c in calls:
            try:
                json.loads(c["function"]["arguments"])
            except ValueError:
                raise bad(f"messages[{i}].tool_calls", "'arguments' must be a JSON text.") from None
        extra["tool_calls"] = calls
    if m.role == "tool":
        if not isinstance(m.tool_call_id, str):
            raise bad(f"messages[{i}].tool_call_id", "a 'tool' message needs the 'tool_call_id' it answers.",
                      "missing_required_parameter")
        extra["tool_call_id"] = m.tool_call_id
    return extra


def validate_request(req: ChatCompletionRequest, model_id: str, max_context: int, max_token_chars: int,
                     default_max_tokens: int) -> dict:
    """Check the values of a well-typed request; raise APIError(400/404) like OpenAI does.

    Returns the settings to generate with: messages (role/content dicts, plus tool_calls / tool_call_id),
    max_tokens, temperature, top_p, stop (list), seed, stream, include_usage, tools (None when no tool may
    be called), tool_choice ("none", "auto", "required" or a name), answer_schema (response_format's
    schema or None). Cheap: nothing here tokenises.
    """
    if req.model != model_id:
        raise APIError(404, f"The model {req.model[:100]!r} does not exist. Available: {model_id}.", "model",
                       "model_not_found")
    if not req.messages:
        raise APIError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                       "but got an empty array instead.", "messages", "empty_array")
    if len(req.messages) > MAX_MESSAGES:
        raise APIError(400, f"Invalid 'messages': array too long. Expected at most {MAX_MESSAGES} "
                       f"messages, but got {len(req.messages)}.", "messages", "array_above_max_length")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"Invalid value for 'messages[{i}].role': {m.role[:50]!r}. Supported values are: "
                           f"{', '.join(repr(r) for r in ROLES)}.", f"messages[{i}].role", "invalid_value")
        content = message_text(m.content, f"messages[{i}].content")
        if len(content) > MAX_CONTENT_CHARS:
            raise APIError(400, f"Invalid 'messages[{i}].content': string too long. Expected at most "
                           f"{MAX_CONTENT_CHARS} characters, but got {len(content)}.",
                           f"messages[{i}].content", "string_above_max_length")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content,
                         **check_message_calls(m, i)})
    tools = None if req.tools is None else check_tools(req.tools)
    tool_choice = check_tool_choice(req.tool_choice, tools)
    answer_schema = check_response_format(req.response_format)

    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # our default, not the client's choice: it may be cut to the context
        max_tokens = min(default_max_tokens, max_context)
    checked_int(name, max_tokens, 1, max_context, f" (this model's context is {max_context} tokens)")
    # Cheap bound before tokenising: a token covers at most max_token_chars characters, so the
    # prompt has at least chars / max_token_chars tokens. A prompt that cannot fit is refused unread.
    chars = sum(len(m["content"]) for m in messages) + (len(json.dumps(tools)) if tools else 0)
    min_prompt_tokens = math.ceil(chars / max_token_chars)
    if min_prompt_tokens + max_tokens > max_context:
        raise APIError(400, f"This model's maximum context length is {max_context} tokens. The messages "
                       f"have {chars} characters (at least {min_prompt_tokens} tokens) and you requested "
                       f"{max_tokens} tokens for the completion.", "messages", "context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default is 1
    temperature = checked_number("temperature", temperature, low=0, high=MAX_TEMPERATURE)
    top_p = None if req.top_p is None else checked_number("top_p", req.top_p, low=0, high=1, low_open=True)
    if req.n not in (None, 1):
        raise APIError(400, f"Invalid 'n': this server returns one choice per request (n=1), got "
                       f"{req.n}.", "n", "unsupported_value")
    seed = None if req.seed is None else checked_int("seed", req.seed, 0, MAX_SEED)
    return {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p if top_p != 1 else None, "stop": stop_strings(req.stop), "seed": seed,
            "stream": bool(req.stream),
            "include_usage": bool(req.stream_options and req.stream_options.include_usage),
            "tools": tools if tool_choice != "none" else None, "tool_choice": tool_choice,
            "answer_schema": answer_schema}
