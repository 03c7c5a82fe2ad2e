"""utils.serving: the OpenAI-compatible chat API, without the notebook.

In-process tests (FastAPI's TestClient) check the schema, streaming and errors on the real model;
two subprocess tests check what start_server() promises: loopback only, the official openai client
works against it, stop() ends it, and the server exits by itself when its parent dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.models import chat, load_chat_model
from utils.serving import MODEL_ID, check_loopback, create_app, start_server, stop_all_servers

REPO = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_chat_model()


@pytest.fixture(scope="module")
def client(model_and_tokenizer):
    from fastapi.testclient import TestClient

    model, tokenizer = model_and_tokenizer
    return TestClient(create_app(model, tokenizer), raise_server_exceptions=False)


def post(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": HELLO, **body})


def sse_events(text: str) -> list[str]:
    """The data payloads of a Server-Sent Events body, in order."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok", "model": MODEL_ID}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_ID]
    assert client.get(f"/v1/models/{MODEL_ID}").json()["object"] == "model"


def test_chat_completion_schema(client, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    r = post(client, temperature=0, max_tokens=16)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL_ID and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # greedy decoding through the server = greedy decoding with transformers' generate()
    assert choice["message"]["content"] == chat(model, tokenizer, HELLO[0]["content"], max_new_tokens=16)


def test_max_tokens_and_finish_reason_length(client):
    body = post(client, temperature=0, max_tokens=3).json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_sequence_cuts_the_text(client):
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = post(client, messages=messages, temperature=0, max_tokens=40).json()["choices"][0]["message"]["content"]
    assert "5" in full
    cut = post(client, messages=messages, temperature=0, max_tokens=40, stop=["5"]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[:full.index("5")]


def test_seeded_sampling_is_reproducible(client):
    a = post(client, temperature=1.0, seed=7, max_tokens=12).json()["choices"][0]["message"]["content"]
    b = post(client, temperature=1.0, seed=7, max_tokens=12).json()["choices"][0]["message"]["content"]
    assert a == b


def test_streaming_chunks_end_with_done_and_add_up_to_the_plain_answer(client):
    plain = post(client, temperature=0, max_tokens=16).json()
    r = post(client, temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == plain["choices"][0]["finish_reason"] and not any(finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_streaming_without_usage_has_no_usage_chunk(client):
    events = sse_events(post(client, temperature=0, max_tokens=4, stream=True).text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"] for e in events[:-1])


@pytest.mark.parametrize("body, status, param, code", [
    ({"messages": []}, 400, "messages", "empty_array"),
    ({"model": "gpt-17"}, 404, "model", "model_not_found"),
    ({"max_tokens": -5}, 400, "max_tokens", "integer_below_min_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "integer_below_min_value"),
    ({"max_completion_tokens": -1}, 400, "max_completion_tokens", "integer_below_min_value"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"n": 3}, 400, "n", "unsupported_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"max_tokens": 10**6}, 400, "messages", "context_length_exceeded"),
    ({"messages": "hi"}, 422, "messages", "list_type"),
    ({"max_tokens": "5"}, 422, "max_tokens", "int_type"),
    ({"messages": [{"content": "no role"}]}, 422, "messages[0].role", "missing"),
])
def test_bad_requests_get_4xx_with_an_openai_error_body(client, body, status, param, code):
    r = post(client, **body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


def test_missing_model_field_and_invalid_json_are_422(client):
    r = client.post("/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 422 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "json_invalid"


def test_unknown_routes_and_models_are_404_in_openai_shape(client):
    for path in ("/v1/nothing-here", "/v1/models/gpt-17"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


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


def test_subprocess_server_with_the_openai_client():
    import openai
    import psutil
    server = start_server()
    try:
        assert server.running() and server.base_url.startswith("http://127.0.0.1:")
        listening = [c for c in psutil.Process(server.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)  # loopback only
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
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
