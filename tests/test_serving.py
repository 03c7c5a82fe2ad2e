"""utils.serving (the OpenAI-compatible chat API) and utils.server_process (running it as a child process).

Fast tests call the FastAPI app in-process (TestClient) with the stand-in models of tests/standin.py:
a ScriptedModel, whose greedy output is a known text, pins the content, finish reasons, stop sequences
and usage counts exactly; the tiny random Llama checks the real decoding path against transformers'
generate() and lesson 06's sampler. Slow tests repeat the key checks on SmolLM2 and start real server
processes (loopback only, the official openai client, stop(), the parent-death watchdog).
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
import torch
from transformers import GenerationConfig

from tests.standin import ScriptedModel, tiny_chat_model
from utils.sampling import generate
from utils.server_process import check_loopback
from utils.serving import MODEL_ID, create_app, held_back_chars, start_server, stop_all_servers, stream_text

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


def make_client(model, tokenizer):
    from fastapi.testclient import TestClient

    return TestClient(create_app(model, tokenizer), raise_server_exceptions=False)


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


def test_health_and_models(scripted):
    client, _ = scripted
    assert client.get("/health").json() == {"status": "ok", "model": MODEL_ID}
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
    assert len(pieces) > 10


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
# Bad requests


@pytest.mark.parametrize("body, status, param, code", [
    ({"messages": []}, 400, "messages", "empty_array"),
    ({"model": "gpt-17"}, 404, "model", "model_not_found"),
    ({"max_tokens": -5}, 400, "max_tokens", "integer_below_min_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "integer_below_min_value"),
    ({"max_completion_tokens": -1}, 400, "max_completion_tokens", "integer_below_min_value"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"n": 3}, 400, "n", "unsupported_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"max_tokens": 10**6}, 400, "messages", "context_length_exceeded"),
    ({"messages": "hi"}, 422, "messages", "list_type"),
    ({"max_tokens": "5"}, 422, "max_tokens", "int_type"),
    ({"messages": [{"content": "no role"}]}, 422, "messages[0].role", "missing"),
])
def test_bad_requests_get_4xx_with_an_openai_error_body(tiny_client, body, status, param, code):
    r = post(tiny_client, **body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


def test_missing_model_field_and_invalid_json_are_422(tiny_client):
    r = tiny_client.post("/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 422 and r.json()["error"]["param"] == "model"
    r = tiny_client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "json_invalid"


def test_unknown_routes_and_models_are_404_in_openai_shape(tiny_client):
    for path in ("/v1/nothing-here", "/v1/models/gpt-17"):
        r = tiny_client.get(path)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


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
