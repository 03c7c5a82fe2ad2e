"""Tool calling and structured output through the course server, driven by the official openai client.

The client talks to the FastAPI app in-process (a TestClient is an httpx.Client), so these tests are
fast: a ScriptedLM (its greedy output is a known text) pins the response shapes exactly, and the tiny
random Llama shows the grammar keeps calls and JSON valid whatever the model prefers.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from tests.standin import tiny_chat_model
from tests.test_serving import ScriptedLM, make_client
from utils.serving import MODEL_ID
from utils.tool_calls import (
    ToolCallStream,
    call_problem,
    format_tool_call,
    parse_tool_call,
    render_messages,
    tool_call_grammar,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 3}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
CALL_TEXT = format_tool_call("get_weather", {"city": "Oslo", "unit": "celsius"})
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


def api(model, tokenizer) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0,
                         http_client=make_client(model, tokenizer))


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_chat_model()
    # the tool descriptions are ~800 byte tokens: give the random model room (RoPE has no fixed table)
    model.config.max_position_embeddings = 2048
    return model, tokenizer


@pytest.fixture(scope="module")
def scripted_call(tiny):
    return api(ScriptedLM(tiny[1], CALL_TEXT), tiny[1])


@pytest.fixture(scope="module")
def random_api(tiny):
    return api(*tiny)


# ------------------------------------------------------------------------------------------------
# The format: parser, validity, rendering, streaming deltas


def test_parse_tool_call():
    assert parse_tool_call(CALL_TEXT) == {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}
    assert parse_tool_call("Sure! " + CALL_TEXT + " done")["name"] == "get_weather"  # text around it
    assert parse_tool_call('<tool_call>{"name": "add", "arguments": {"a": 1}}')["arguments"] == {"a": 1}  # unclosed
    tricky = format_tool_call("add", {"note": "}}</tool_call> x"})  # the closing tag inside a string
    assert parse_tool_call(tricky) == {"name": "add", "arguments": {"note": "}}</tool_call> x"}}
    for text in ["no call here", "<tool_call>{name: add}</tool_call>", '<tool_call>{"name": 3, "arguments": {}}',
                 '<tool_call>{"name": "add", "arguments": "1, 2"}</tool_call>', '<tool_call>["add"]</tool_call>']:
        assert parse_tool_call(text) is None, text
    with pytest.raises(TypeError):
        parse_tool_call(None)


def test_call_problem():
    assert call_problem(parse_tool_call(CALL_TEXT), TOOLS) is None
    assert call_problem(None, TOOLS) == "no well-formed tool call"
    assert "unknown tool" in call_problem({"name": "delete_all", "arguments": {}}, TOOLS)
    assert "schema" in call_problem({"name": "add", "arguments": {"a": 1}}, TOOLS)  # b is required
    assert "schema" in call_problem({"name": "get_weather", "arguments": {"city": "X", "unit": "kelvin"}}, TOOLS)


def test_render_messages_puts_tools_in_the_system_turn_and_results_in_user_turns():
    messages = [{"role": "system", "content": "Be brief."}, *ASK,
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"}]
    turns = render_messages(messages, TOOLS)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Be brief.") and "get_weather" in turns[0]["content"]
    assert turns[2]["content"] == CALL_TEXT
    assert turns[3]["content"] == '<tool_result name="get_weather">4 degrees, rain</tool_result>'
    assert render_messages(ASK) == ASK  # no tools: unchanged


def test_tool_call_stream_deltas_add_up():
    splitter, deltas = ToolCallStream("call_x"), []
    for ch in CALL_TEXT:
        deltas += splitter.feed(ch)
    deltas += splitter.feed("", final=True)
    assert splitter.is_call()
    assert deltas[0]["tool_calls"][0] == {"index": 0, "id": "call_x", "type": "function",
                                          "function": {"name": "get_weather", "arguments": ""}}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert json.loads(args) == {"city": "Oslo", "unit": "celsius"}
    plain = ToolCallStream("call_y")
    assert plain.feed("<to") == [] and plain.feed("ast is great") == [{"content": "<toast is great"}]


def test_grammar_refuses_unknown_tool_choice(tiny):
    with pytest.raises(ValueError, match="tool_choice"):
        tool_call_grammar(tiny[1], TOOLS, "delete_all")


# ------------------------------------------------------------------------------------------------
# The server, through the official client


def test_a_call_comes_back_as_tool_calls(scripted_call):
    r = scripted_call.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "unit": "celsius"}


def test_a_streamed_call_arrives_as_openai_streams_it(scripted_call):
    chunks = list(scripted_call.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS,
                                                        temperature=0, stream=True))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content is None
    header = first.tool_calls[0]
    assert header.index == 0 and header.id.startswith("call_") and header.function.name == "get_weather"
    pieces = [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[1:]
              if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) > 5  # streamed in pieces
    assert json.loads("".join(pieces)) == {"city": "Oslo", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_next_turn_accepts_tool_results(tiny):
    client = api(ScriptedLM(tiny[1], "It is 4 degrees and raining in Oslo."), tiny[1])
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
    r = client.chat.completions.create(model=MODEL_ID, tools=TOOLS, temperature=0, messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"}])
    assert r.choices[0].message.content == "It is 4 degrees and raining in Oslo."
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


ECHO = '<tool_result name="get_weather">4 degrees, rain</tool_result>'


@pytest.mark.parametrize("stream", [False, True])
def test_an_echoed_tool_result_is_cut_not_sent(tiny, stream):
    # a small model tends to copy the last <tool_result> turn as its answer: the tag is a stop string
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"}]
    for script, expected in [("It is 4 degrees." + ECHO, "It is 4 degrees."), (ECHO, "")]:
        client = api(ScriptedLM(tiny[1], script), tiny[1])
        r = client.chat.completions.create(model=MODEL_ID, tools=TOOLS, tool_choice="none", temperature=0,
                                           messages=turns, stream=stream)
        if stream:
            pieces = [c.choices[0].delta.content or "" for c in r if c.choices]
            assert "".join(pieces) == expected, pieces
        else:
            assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    # without tool results in the conversation the tag is just text (nothing to echo)
    r = api(ScriptedLM(tiny[1], "It is." + ECHO), tiny[1]).chat.completions.create(
        model=MODEL_ID, messages=ASK, temperature=0)
    assert r.choices[0].message.content == "It is." + ECHO


class GradProbe(ScriptedLM):
    """ScriptedLM that records, at every forward pass, whether autograd would record it."""

    def __init__(self, tokenizer, text):
        super().__init__(tokenizer, text)
        self.grad_modes = []

    def forward(self, *args, **kwargs):
        self.grad_modes.append(torch.is_grad_enabled())
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("extra", [{"tools": TOOLS}, {}])
def test_generation_in_the_server_records_no_autograd_graph(tiny, extra):
    # the server decodes on worker threads, where autograd is on by default: without inference_mode every
    # request kept all its activations (hundreds of MB on SmolLM2) until it ended
    probe = GradProbe(tiny[1], CALL_TEXT)
    api(probe, tiny[1]).chat.completions.create(model=MODEL_ID, messages=ASK, temperature=0, max_tokens=8, **extra)
    assert probe.grad_modes and not any(probe.grad_modes)


def test_tool_choice_none_answers_in_text(scripted_call):
    r = scripted_call.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="none",
                                              temperature=0)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


@pytest.mark.parametrize("seed", range(4))
def test_random_model_makes_only_valid_calls(random_api, seed):
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        r = random_api.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice=choice,
                                               temperature=1.0, seed=seed, max_tokens=400)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        assert call_problem({"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                            TOOLS) is None
        if isinstance(choice, dict):
            assert call.function.name == "add"


@pytest.mark.parametrize("seed", range(3))
def test_structured_output_is_valid_json(random_api, seed):
    schema = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]},
              "stars": {"type": "integer", "minimum": 1, "maximum": 5},
              "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
              "required": ["sentiment", "stars", "tags"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": schema, "strict": True}}
    r = random_api.chat.completions.create(model=MODEL_ID, messages=ASK, response_format=fmt, temperature=1.0,
                                           seed=seed, max_tokens=600)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    stream = random_api.chat.completions.create(model=MODEL_ID, messages=ASK, response_format=fmt,
                                                temperature=1.0, seed=seed, max_tokens=600, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content  # same seed, same answer, streamed


BAD_TOOL = {"type": "function", "function": {"name": "x", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "pattern": "^a"}}}}}


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [{"type": "function"}]}, "tools[0]", "function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0]", "function"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [ADD, ADD]}, "tools[1].function.name", "twice"),
    ({"tools": [BAD_TOOL]}, "tools[0].function.parameters", "'pattern'"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "delete_all"}}},
     "tool_choice", "not one of"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "expected"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when"),
    ({"response_format": {"type": "json_object"}}, "response_format.type", "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": []}}}},
     "response_format.json_schema.schema", "'anyOf'"),
    ({"messages": [{"role": "tool", "content": "4"}]}, "messages[0].tool_call_id", "tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
     "messages[0].tool_calls", "expected"),
])
def test_bad_tool_requests_are_400_in_openai_shape(random_api, extra, param, words):
    body = {"model": MODEL_ID, "messages": ASK, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        random_api.chat.completions.create(**body)
    error = err.value.body
    assert err.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_serve_in_thread_answers_over_http_and_stops(tiny):
    import httpx

    from utils.server_process import port_is_open
    from utils.serving import create_app, serve_in_thread

    with pytest.raises(ValueError, match="loopback"):
        serve_in_thread(create_app(*tiny), host="0.0.0.0")
    server = serve_in_thread(create_app(ScriptedLM(tiny[1], CALL_TEXT), tiny[1]))
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                               http_client=httpx.Client(trust_env=False, timeout=60))
        r = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, temperature=0)
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    finally:
        server.stop()
    assert not server.running() and not port_is_open(server.host, server.port)


@pytest.mark.slow
def test_smollm2_server_makes_valid_calls_and_json():
    import httpx

    from utils.serving import start_server

    with start_server() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                               http_client=httpx.Client(trust_env=False, timeout=300))
        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                               tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=64)
            (call,) = r.choices[0].message.tool_calls
            assert call_problem({"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                                TOOLS) is None
        schema = WEATHER["function"]["parameters"]
        r = client.chat.completions.create(model=MODEL_ID, messages=ASK, temperature=0, max_tokens=64,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "w", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
