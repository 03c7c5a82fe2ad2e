"""utils.serving (the OpenAI-compatible chat API) and utils.server_process (running it as a child process).

Fast tests call the FastAPI app in-process (TestClient) with the stand-in models of tests/standin.py:
a ScriptedModel, whose greedy output is a known text, pins the content, finish reasons, stop sequences
and usage counts exactly; the tiny random Llama checks the real decoding path against transformers'
generate() and lesson 06's sampler. Slow tests repeat the key checks on SmolLM2 and start real server
processes (loopback only, the official openai client, stop(), the parent-death watchdog).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from tests.standin import ScriptedModel, tiny_chat_model
from utils.sampling import generate
from utils.server_process import check_loopback
from utils.serving import (
    MAX_BODY_BYTES,
    MAX_CONTENT_CHARS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MODEL_ID,
    create_app,
    held_back_chars,
    start_server,
    stop_all_servers,
    stream_text,
)

REPO = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
SCRIPT = "Paris is the capital. It is in France."


class ScriptedLM(ScriptedModel):
    """ScriptedModel, recognised by utils.sampling as a transformers model (it looks for these two)."""

    def __init__(self, tokenizer, text: str):
        super().__init__(tokenizer, text)
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        raise NotImplementedError("only utils.sampling's own loop drives this model")


def make_client(model, tokenizer, **kwargs):
    from fastapi.testclient import TestClient

    return TestClient(create_app(model, tokenizer, **kwargs), base_url="http://127.0.0.1:8000",
                      raise_server_exceptions=False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def scripted(tiny):
    _, tokenizer = tiny
    return make_client(ScriptedLM(tokenizer, SCRIPT), tokenizer), tokenizer


@pytest.fixture(scope="module")
def tiny_client(tiny):
    return make_client(*tiny)


def post(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": HELLO, **body})


def sse_events(text: str) -> list[str]:
    """The data payloads of a Server-Sent Events body, in order."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def streamed(client, **body) -> tuple[str, list[dict]]:
    """(the content of all chunks joined, the chunks) of a streamed completion."""
    r = post(client, stream=True, **body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, chunks


def prompt_length(tokenizer, messages=HELLO) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])


# ------------------------------------------------------------------------------------------------
# The schema, with a model whose answer is known


def test_health_and_models(scripted, tiny):
    client, _ = scripted
    assert client.get("/health").json() == {"status": "ok", "model": MODEL_ID}
    health = make_client(*tiny, instance_id="abc").get("/health").json()  # start_server's id for its child
    assert health == {"status": "ok", "model": MODEL_ID, "instance_id": "abc"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_ID]
    assert client.get(f"/v1/models/{MODEL_ID}").json()["object"] == "model"


def test_completion_is_the_models_text_with_usage(scripted):
    client, tokenizer = scripted
    r = post(client, temperature=0, max_tokens=100)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL_ID and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": SCRIPT}
    assert choice["finish_reason"] == "stop"  # the model ended with its end-of-sequence token
    n = len(tokenizer.encode(SCRIPT, add_special_tokens=False))  # the eos token is not counted
    assert body["usage"] == {"prompt_tokens": prompt_length(tokenizer), "completion_tokens": n,
                             "total_tokens": prompt_length(tokenizer) + n}


def test_max_tokens_cuts_the_text_with_finish_reason_length(scripted):
    client, tokenizer = scripted
    body = post(client, temperature=0, max_tokens=5).json()
    ids = tokenizer.encode(SCRIPT, add_special_tokens=False)[:5]
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(ids) == SCRIPT[:5]
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    body = post(client, temperature=0, max_completion_tokens=3).json()  # the newer name of max_tokens
    assert body["choices"][0]["message"]["content"] == SCRIPT[:3]


@pytest.mark.parametrize("stop, expected", [
    ("capital", "Paris is the "),
    (["France", "It"], "Paris is the capital. "),  # the earliest of several stop strings
    (["zebra"], SCRIPT),           # never appears: the whole text, finished by eos
])
def test_stop_sequences_cut_plain_and_streamed_answers(scripted, stop, expected):
    client, _ = scripted
    choice = post(client, temperature=0, max_tokens=100, stop=stop).json()["choices"][0]
    assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
    text, chunks = streamed(client, temperature=0, max_tokens=100, stop=stop)
    assert text == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_streamed_chunks_add_up_to_the_text_and_usage(scripted):
    client, _ = scripted
    plain = post(client, temperature=0, max_tokens=100).json()
    text, chunks = streamed(client, temperature=0, max_tokens=100, stream_options={"include_usage": True})
    assert text == SCRIPT
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]
    assert len([p for p in pieces if p]) > 10  # streamed in pieces, not in one block at the end
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_streamed_length_finish_and_no_usage_chunk_unless_asked(scripted):
    client, _ = scripted
    text, chunks = streamed(client, temperature=0, max_tokens=4)
    assert text == SCRIPT[:4]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"] and "usage" not in c for c in chunks)


def test_stream_text_never_sends_a_stop_string_in_part(tiny):
    _, tokenizer = tiny
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    pieces = list(stream_text(ScriptedLM(tokenizer, SCRIPT), tokenizer, ids, 100, stop=["It is in"]))
    # pieces are only ever appended: had "I" or "It i" been sent before the stop string was complete,
    # it would be part of this text
    assert "".join(piece for piece, _, _ in pieces) == "Paris is the capital. " and pieces[-1][1] == "stop"
    assert len(pieces) == len("Paris is the capital. It is in")  # one per step (one byte token per step)
    assert [piece for piece, _, _ in pieces[-8:]] == [""] * 8  # "It is in": held back, then dropped


def test_held_back_chars():
    assert held_back_chars("Hello wor", ["world"]) == 3
    assert held_back_chars("Hello", ["world"]) == 0
    assert held_back_chars("caf\ufffd", []) == 1  # half of a UTF-8 character: wait for the rest


# ------------------------------------------------------------------------------------------------
# The decoding path, on a real (tiny, random) transformers model


def test_greedy_answer_is_what_transformers_generate_gives(tiny, tiny_client):
    model, tokenizer = tiny
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    body = post(tiny_client, temperature=0, max_tokens=12).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert streamed(tiny_client, temperature=0, max_tokens=12)[0] == expected


def test_seeded_sampling_is_lesson_06s_sampler(tiny, tiny_client):
    model, tokenizer = tiny
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = generate(model, ids, 12, temperature=1.0, top_p=0.9, eos_token_id=tokenizer.eos_token_id,
                   generator=torch.Generator().manual_seed(7))
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    expected = tokenizer.decode(new, skip_special_tokens=True)
    texts = [post(tiny_client, temperature=1.0, top_p=0.9, seed=7, max_tokens=12).json()
             ["choices"][0]["message"]["content"] for _ in range(2)]
    assert texts == [expected, expected]
    other = post(tiny_client, temperature=1.0, top_p=0.9, seed=8, max_tokens=12).json()
    assert other["choices"][0]["message"]["content"] != expected


# ------------------------------------------------------------------------------------------------
# Bad requests: refused before the model runs, with a 4xx and OpenAI's error body


def assert_error(r, status: int, param, code, type="invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type, param, code)
    return error


@pytest.mark.parametrize("body, param", [  # wrong types are refused, never converted (and 400, not 422)
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": "1"}, "top_p"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_completion_tokens": True}, "max_completion_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"n": "1"}, "n"),
    ({"seed": 1.0}, "seed"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"model": 5}, "model"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [5]}, "messages[0]"),
    ({"messages": [{"role": 5, "content": "hi"}]}, "messages[0].role"),
])
def test_wrong_types_are_400_with_the_param(tiny_client, body, param):
    error = assert_error(post(tiny_client, **body), 400, param, "invalid_type")
    assert param in error["message"]


@pytest.mark.parametrize("body, param, code", [  # shapes checked by hand, not by pydantic
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content",
     "invalid_type"),
    ({"stop": 5}, "stop", "invalid_value"),
    ({"stop": ["a", 5]}, "stop", "invalid_value"),
    ({"stop": {"a": 1}}, "stop", "invalid_value"),
    ({"messages": [{"content": "no role"}]}, "messages[0].role", "missing_required_parameter"),
])
def test_wrong_shapes_are_400_with_the_param(tiny_client, body, param, code):
    assert_error(post(tiny_client, **body), 400, param, code)


def test_a_body_that_is_not_a_json_object_is_400(tiny_client):
    r = tiny_client.post("/v1/chat/completions", json={"messages": HELLO})
    assert "'model'" in assert_error(r, 400, "model", "missing_required_parameter")["message"]
    r = tiny_client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, None, "json_invalid")
    assert_error(tiny_client.post("/v1/chat/completions", json=[1, 2]), 400, None, "invalid_type")


@pytest.mark.parametrize("body, status, param, code", [
    ({"messages": []}, 400, "messages", "empty_array"),
    ({"model": "gpt-17"}, 404, "model", "model_not_found"),
    ({"max_tokens": -5}, 400, "max_tokens", "integer_below_min_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "integer_below_min_value"),
    ({"max_completion_tokens": -1}, 400, "max_completion_tokens", "integer_below_min_value"),
    ({"max_tokens": 513}, 400, "max_tokens", "integer_above_max_value"),  # the tiny model's context: 512
    ({"max_tokens": 10**30}, 400, "max_tokens", "integer_above_max_value"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"temperature": -0.1}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"n": 3}, 400, "n", "unsupported_value"),
    ({"n": 0}, 400, "n", "unsupported_value"),
    ({"seed": -1}, 400, "seed", "integer_below_min_value"),
    ({"seed": 2**63}, 400, "seed", "integer_above_max_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"stop": ""}, 400, "stop", "invalid_value"),
    ({"stop": ["a", ""]}, 400, "stop", "invalid_value"),
    ({"stop": "x" * (MAX_STOP_CHARS + 1)}, 400, "stop", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].tool_call_id", "missing_required_parameter"),
])
def test_values_out_of_range_are_4xx_with_an_openai_error_body(tiny_client, body, status, param, code):
    assert_error(post(tiny_client, **body), status, param, code)


def test_the_error_says_the_cap(tiny_client, scripted):
    assert "[1, 512]" in assert_error(post(tiny_client, max_tokens=600), 400, "max_tokens",
                                      "integer_above_max_value")["message"]
    r = post(tiny_client, messages=[{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1), max_tokens=1)
    assert f"at most {MAX_MESSAGES}" in assert_error(r, 400, "messages", "array_above_max_length")["message"]
    r = post(tiny_client, messages=[{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}])
    error = assert_error(r, 400, "messages[0].content", "string_above_max_length")
    assert f"at most {MAX_CONTENT_CHARS}" in error["message"]
    client, _ = scripted  # a context of 4096 tokens, room for MAX_MESSAGES short messages
    assert post(client, messages=[{"role": "user", "content": "hi"}] * MAX_MESSAGES, max_tokens=1).status_code == 200


def test_nan_and_infinity_are_refused(tiny_client):
    for name in ("temperature", "top_p"):
        for value in ("NaN", "Infinity", "-Infinity"):
            body = f'{{"model": "{MODEL_ID}", "messages": [{{"role": "user", "content": "hi"}}], "{name}": {value}}}'
            r = tiny_client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert_error(r, 400, name, "invalid_value")


def test_bad_arguments_are_refused_before_a_stream_starts(tiny_client):
    for body in ({"seed": 2**64}, {"temperature": "0.5"}, {"stop": [""]}, {"max_tokens": 10**6}):
        r = post(tiny_client, stream=True, **body)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json" and "error" in r.json()


def test_unknown_fields_are_ignored(scripted):
    client, _ = scripted
    r = post(client, temperature=0, max_tokens=100, frobnicate=[1, 2], user="me", logit_bias={"5": 1},
             messages=[{"role": "user", "content": "hi", "name": "bob"}])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == SCRIPT


def test_the_prompt_size_is_checked_in_characters_before_tokenising(tiny, monkeypatch):
    model, tokenizer = tiny
    client = make_client(model, tokenizer)
    # The tiny tokenizer's longest token is "<|endoftext|>", 13 characters: a prompt of 13 * 512 + 1
    # characters needs more than the 512 positions, whatever its tokens.
    assert max(len(t) for t in tokenizer.get_vocab()) == 13
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: pytest.fail("tokenised"))
    r = post(client, messages=[{"role": "user", "content": "x" * (13 * 512 + 1)}], max_tokens=1)
    assert "characters" in assert_error(r, 400, "messages", "context_length_exceeded")["message"]
    monkeypatch.undo()
    # Under that bound, the exact check counts tokens (the byte tokenizer: one per character, plus the template)
    messages = [{"role": "user", "content": "x" * 450}]
    r = post(client, messages=messages, max_tokens=60)
    needed = prompt_length(tokenizer, messages) + 60
    assert f"you requested {needed} tokens" in assert_error(r, 400, "messages", "context_length_exceeded")["message"]
    assert post(client, messages=messages, max_tokens=512 - prompt_length(tokenizer, messages)).status_code == 200


def test_unknown_routes_and_models_are_404_in_openai_shape(tiny_client):
    for path in ("/v1/nothing-here", "/v1/models/gpt-17"):
        r = tiny_client.get(path)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_the_openai_client_raises_bad_request_errors(tiny):
    import openai

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0,
                           http_client=make_client(*tiny))  # a TestClient is an httpx.Client
    for extra in ({"temperature": "0.5"}, {"max_tokens": 1.5}, {"stream": "yes"}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_ID, messages=HELLO, extra_body=extra)
        assert err.value.status_code == 400 and err.value.body["param"] == next(iter(extra))


# ------------------------------------------------------------------------------------------------
# Hostile requests: too big, from a foreign page, many at once, abandoned


def asgi_request(app, body_chunks, headers=(), host=b"127.0.0.1:8000", client=("127.0.0.1", 50000),
                 hang_up=None) -> tuple[int, bytes]:
    """POST /v1/chat/completions to the ASGI app directly, as uvicorn would: (status, response body).

    body_chunks: bytes pulled one receive() at a time (a chunked upload). hang_up: an async function;
    once it returns, the client disconnects (by default it waits for the answer)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "query_string": b"",
             "raw_path": b"/v1/chat/completions", "root_path": "", "client": client, "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), *([(b"host", host)] if host else []), *headers]}
    chunks, body_done, sent = iter(body_chunks), False, []

    async def receive():
        nonlocal body_done
        chunk = next(chunks, None)
        if chunk is not None:
            return {"type": "http.request", "body": chunk, "more_body": True}
        if not body_done:
            body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await (hang_up() if hang_up else asyncio.sleep(3600))
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def request_bytes(**body) -> bytes:
    return json.dumps({"model": MODEL_ID, "messages": HELLO, **body}).encode()


def test_a_body_over_the_limit_is_413_by_content_length_without_being_read(tiny_client):
    r = tiny_client.post("/v1/chat/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                         headers={"content-type": "application/json"})
    error = assert_error(r, 413, None, "request_too_large")
    assert str(MAX_BODY_BYTES) in error["message"]
    app = tiny_client.app
    pulled = []
    status, _ = asgi_request(app, (pulled.append(1) or b"x" for _ in range(10)),
                             headers=[(b"content-length", str(MAX_BODY_BYTES + 1).encode())])
    assert status == 413 and pulled == []  # refused on the header alone
    # a big but allowed body goes through
    content = request_bytes(max_tokens=1)[:-1] + b" " * (MAX_BODY_BYTES - len(request_bytes(max_tokens=1))) + b"}"
    assert len(content) == MAX_BODY_BYTES
    assert tiny_client.post("/v1/chat/completions", content=content,
                            headers={"content-type": "application/json"}).status_code == 200


def test_a_chunked_body_is_not_read_past_the_limit(tiny_client):
    chunk = 64 * 1024
    pulled = 0

    def big_body():  # 4 MiB, no Content-Length: only the bytes read can tell
        nonlocal pulled
        while pulled < 4 * MAX_BODY_BYTES:
            pulled += chunk
            yield b" " * chunk

    status, body = asgi_request(tiny_client.app, big_body())
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert MAX_BODY_BYTES < pulled <= MAX_BODY_BYTES + chunk


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:1234", "LOCALHOST", "[::1]:8000",
                                  "[::1]", "127.0.0.2:80"])
def test_loopback_host_headers_are_served(tiny_client, host):
    assert tiny_client.get("/health", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "localhost.attacker.example",
                                  "127.0.0.1.nip.io", "192.168.1.10:8000", "0.0.0.0:8000", "::1", "[::1]x",
                                  "127.0.0.1:80x", "127.0.0.1@evil", ""])
def test_other_host_headers_are_refused_dns_rebinding(tiny_client, host):
    assert_error(tiny_client.get("/health", headers={"host": host}), 400, "Host", "invalid_host")
    r = tiny_client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": HELLO}, headers={"host": host})
    assert_error(r, 400, "Host", "invalid_host")


def test_the_testclient_host_is_allowed_only_in_process(tiny):
    from fastapi.testclient import TestClient

    app = create_app(*tiny)
    assert TestClient(app).get("/health").status_code == 200  # Host "testserver", client "testclient"
    ok = [request_bytes(max_tokens=1)]
    assert asgi_request(app, ok)[0] == 200
    assert asgi_request(app, ok, host=b"testserver")[0] == 400  # from a real client address
    assert asgi_request(app, ok, host=None)[0] == 400  # no Host (HTTP/1.0)
    assert asgi_request(app, ok, headers=[(b"host", b"attacker.example")])[0] == 400  # two Host headers


def test_health_answers_while_requests_wait_for_the_model(tiny):
    from fastapi.testclient import TestClient

    _, tokenizer = tiny
    app = create_app(ScriptedLM(tokenizer, SCRIPT), tokenizer)
    statuses, health = [], {}

    def get_health():
        start = time.perf_counter()
        health["status"] = client.get("/health").status_code
        health["seconds"] = time.perf_counter() - start

    with TestClient(app, base_url="http://127.0.0.1:8000") as client:  # one event loop for all requests
        with app.state.step_lock:  # the model is busy: every generation waits for it
            waiting = [threading.Thread(target=lambda: statuses.append(post(client, max_tokens=2).status_code))
                       for _ in range(48)]
            for thread in waiting:
                thread.start()
            time.sleep(0.5)  # let them reach the lock and fill the worker threads
            probe = threading.Thread(target=get_health)
            probe.start()
            probe.join(5)  # (a /health stuck behind the generations would only answer once the lock is free)
            finished_while_busy = list(statuses)
        for thread in [probe, *waiting]:
            thread.join(30)
    assert health["status"] == 200 and health["seconds"] < 1.0
    assert finished_while_busy == [] and statuses == [200] * 48


class SlowScriptedLM(ScriptedLM):
    """ScriptedLM that counts its forward passes, takes `delay` s each, and can fail at pass `fail_at`."""

    def __init__(self, tokenizer, text, delay=0.0, fail_at=None):
        super().__init__(tokenizer, text)
        self.delay, self.fail_at, self.steps = delay, fail_at, 0

    def forward(self, *args, **kwargs):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("the accelerator fell off the bus")
        time.sleep(self.delay)
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_generation_stops_when_the_client_disconnects(tiny, stream):
    _, tokenizer = tiny
    model = SlowScriptedLM(tokenizer, "ab" * 300, delay=0.01)  # 600 tokens: 6 s if nobody stops it
    app = create_app(model, tokenizer)

    async def hang_up_after_3_steps():
        while model.steps < 3:
            await asyncio.sleep(0.005)

    asgi_request(app, [request_bytes(max_tokens=500, temperature=0, stream=stream)], hang_up=hang_up_after_3_steps)
    time.sleep(0.2)  # a streamed generation may finish its current step in its worker thread
    assert 3 <= model.steps < 30


def test_temperature_1e_40_is_greedy_not_an_error(tiny_client):
    greedy = post(tiny_client, temperature=0, max_tokens=12).json()["choices"][0]["message"]["content"]
    for body in ({}, {"top_p": 0.5}):
        r = post(tiny_client, temperature=1e-40, seed=0, max_tokens=12, **body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy
    assert streamed(tiny_client, temperature=1e-40, seed=0, max_tokens=12)[0] == greedy


@pytest.mark.parametrize("script, stop, expected", [
    (SCRIPT, "France.", "Paris is the capital. It is in "),  # the stop string is the very end of the text
    (SCRIPT, ". It", "Paris is the capital"),                   # across words, one token per byte
    (SCRIPT, "capital!", SCRIPT),                               # "capital" is held back, then released
    ("Un café au lait.", "é au", "Un caf"),                     # "é" is two byte tokens
    ("Un café au lait.", "au lait.", "Un café "),
])
def test_no_part_of_a_stop_string_reaches_the_client(tiny, script, stop, expected):
    _, tokenizer = tiny
    client = make_client(ScriptedLM(tokenizer, script), tokenizer)
    choice = post(client, temperature=0, max_tokens=100, stop=stop).json()["choices"][0]
    assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
    text, chunks = streamed(client, temperature=0, max_tokens=100, stop=[stop])
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert text == expected  # pieces are only appended: a sent piece of the stop string would be here
    assert all(stop not in "".join(pieces[i:]) for i in range(len(pieces)))


def test_a_failure_mid_stream_ends_with_an_error_event_and_done(tiny):
    import openai

    _, tokenizer = tiny
    model = SlowScriptedLM(tokenizer, SCRIPT, fail_at=5)  # 4 passes, 4 tokens, then an error
    client = make_client(model, tokenizer)
    r = post(client, stream=True, temperature=0, max_tokens=50)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]) == SCRIPT[:4]
    model.steps = 0
    api = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0, http_client=client)
    with pytest.raises(openai.APIError, match="RuntimeError"):
        for _ in api.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=50, stream=True):
            pass
    model.steps = 0
    error = assert_error(post(client, temperature=0, max_tokens=50), 500, None, None, type="server_error")
    assert "RuntimeError" in error["message"]  # the kind of failure, not its details


# ------------------------------------------------------------------------------------------------
# Process management: what is refused before anything starts (fast), real processes (slow)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts_are_accepted(host):
    assert check_loopback(host) == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", ""])
def test_non_loopback_hosts_are_refused_before_anything_starts(host):
    with pytest.raises(ValueError, match="loopback"):
        start_server(host=host)
    assert stop_all_servers() == 0  # nothing was started


def test_start_server_rejects_bad_ports_and_hosts():
    with pytest.raises(TypeError):
        start_server(host=None)
    with pytest.raises(ValueError):
        start_server(port=70000)
    with pytest.raises(TypeError):
        start_server(port="8000")
    with pytest.raises(ValueError):
        start_server(port=8000, timeout=0)
    assert stop_all_servers() == 0


@pytest.fixture(scope="module")
def smollm2_client():
    from utils.models import load_chat_model

    model, tokenizer = load_chat_model()
    return make_client(model, tokenizer), model, tokenizer


@pytest.mark.slow
def test_smollm2_greedy_answer_plain_and_streamed_is_what_transformers_generate_gives(smollm2_client):
    client, model, tokenizer = smollm2_client
    ids = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids),
                             pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    body = post(client, temperature=0, max_tokens=16).json()
    assert body["choices"][0]["message"]["content"] == expected and "Paris" in expected
    assert body["usage"]["prompt_tokens"] == ids.shape[1]
    assert streamed(client, temperature=0, max_tokens=16)[0] == expected


@pytest.mark.slow
def test_subprocess_server_with_the_openai_client(monkeypatch):
    import httpx
    import openai
    import psutil

    from utils.server_process import free_port, read_health

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")  # a proxy that is not there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    server = start_server()  # its probe goes straight to 127.0.0.1 anyway
    try:
        assert server.running() and server.base_url.startswith("http://127.0.0.1:")
        assert read_health(server.url) == {"status": "ok", "model": MODEL_ID, "instance_id": server.instance_id}
        listening = [c for c in psutil.Process(server.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)  # loopback only
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                               http_client=httpx.Client(trust_env=False, timeout=60))
        reply = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=8)
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=8, stream=True) if c.choices]
        assert "".join(pieces) == reply.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_ID, messages=[], max_tokens=4)
        assert err.value.status_code == 400 and err.value.body["code"] == "empty_array"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-17", messages=HELLO)
    finally:
        server.stop()
    assert not server.running()
    server.stop()  # a second stop is harmless


@pytest.mark.slow
def test_server_exits_when_its_parent_dies():
    import psutil
    script = ("import time; from utils.serving import start_server; s = start_server(); "
              "print(s.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        child_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(child_pid)
    finally:
        parent.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only the watchdog can help
        parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        psutil.Process(child_pid).kill()
        pytest.fail("the server outlived its parent")
