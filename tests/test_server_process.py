"""utils.server_process: start_server reaches its own child, straight to loopback, and the server refuses
hostile requests over a real socket.

Fast tests use a stand-in "other server" (http.server in a thread) on a loopback port. Slow tests start
processes: a child that another server beat to its port, and the course's app on the tiny stand-in model
under uvicorn, fed hostile raw HTTP and the official openai client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import utils.server_process
from utils.server_process import (
    free_port,
    is_loopback_host_header,
    read_health,
    start_server,
    stop_all_servers,
)
from utils.serving import MAX_BODY_BYTES, MODEL_ID

REPO = Path(__file__).resolve().parent.parent
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def other_server():
    """Someone else's HTTP server on a loopback port: GET /health -> 200 {"status": "ok"}, else 500."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health"
            body = json.dumps({"status": "ok"}).encode() if ok else b"broken"
            self.send_response(200 if ok else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_proxy(monkeypatch):
    """Every proxy variable points at a loopback port where nothing listens; NO_PROXY is unset."""
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return proxy


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.1:8000", True), ("127.9.9.9:1", True), ("localhost", True),
    ("LocalHost:80", True), ("[::1]", True), ("[::1]:8000", True), ("127.0.0.1:", True),
    ("", False), ("::1", False), ("[127.0.0.1]", False), ("[::1]8000", False), ("[localhost]", False),
    ("localhost.", False), ("localhost.attacker.example", False), ("attacker.example:8000", False),
    ("127.0.0.1.nip.io", False), ("0.0.0.0", False), ("192.168.1.10", False), ("127.0.0.1:8o", False),
    ("127.0.0.1 ", False), ("2130706433", False),
])
def test_is_loopback_host_header(host, loopback):
    assert is_loopback_host_header(host) is loopback


def test_read_health_goes_straight_to_loopback_whatever_the_proxy_variables(other_server, dead_proxy):
    url, _ = other_server
    with pytest.raises(httpx.TransportError):  # the premise: a client that trusts the variables fails
        httpx.get(url + "/health", timeout=2)
    assert read_health(url) == {"status": "ok"}


def test_read_health_tells_no_answer_from_a_foreign_answer(other_server):
    url, _ = other_server
    assert read_health(f"http://127.0.0.1:{free_port()}") is None  # nothing listens
    assert read_health(url + "/not-health") == {}  # GET /not-health/health -> 500: an answer, not ours


def test_start_server_refuses_a_port_another_server_answers_on(other_server, dead_proxy):
    _, port = other_server
    with pytest.raises(RuntimeError, match="already in use"):
        start_server(port=port, timeout=5)
    assert stop_all_servers() == 0  # refused before a child was started


@pytest.mark.slow
def test_start_server_refuses_an_answer_without_its_id(other_server, monkeypatch):
    # Another server takes the port between the check and the child's start (a race): the child cannot
    # bind, and the /health that answers is not our child's.
    _, port = other_server
    monkeypatch.setattr(utils.server_process, "port_is_open", lambda host, port: False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="another process answers"):
        start_server(port=port, timeout=60)
    assert time.perf_counter() - start < 10 and stop_all_servers() == 0  # the child was stopped


# ------------------------------------------------------------------------------------------------
# The app under uvicorn, with the tiny stand-in model: hostile requests over a real socket

SERVE_TINY = """
import sys
import uvicorn
from tests.standin import tiny_chat_model
from utils.serving import create_app
uvicorn.run(create_app(*tiny_chat_model(), instance_id="tiny-1"), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning", proxy_headers=False)
"""


@pytest.fixture(scope="module")
def tiny_server():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVE_TINY, str(port)], cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while (read_health(url) or {}).get("instance_id") != "tiny-1":
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the tiny server did not start"
            time.sleep(0.2)
        yield url, port
    finally:
        process.terminate()
        process.wait(10)


def raw_http(port: int, request: bytes, body_chunks=()) -> tuple[bytes, int]:
    """Send request bytes, then chunks as long as the server reads them: (the response, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        sent = 0
        s.settimeout(0.05)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
                sent += len(chunk)
            except (BlockingIOError, socket.timeout, ConnectionError):
                break  # the server has stopped reading
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break  # the server has answered
            except (BlockingIOError, socket.timeout):
                pass
        s.settimeout(10)
        response = b""
        try:
            while chunk := s.recv(65536):
                response += chunk
        except ConnectionError:
            pass
    return response, sent


def post_head(host: bytes = b"127.0.0.1", extra: bytes = b"", close: bool = True) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n" +
            (b"Connection: close\r\n" if close else b"") + extra + b"\r\n")


@pytest.mark.slow
def test_hostile_raw_http_over_a_real_socket(tiny_server):
    _, port = tiny_server
    body = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    response, _ = raw_http(port, post_head(b"attacker.example", b"Content-Length: %d\r\n" % len(body)) + body)
    assert response.startswith(b"HTTP/1.1 400") and b"invalid_host" in response
    response, _ = raw_http(port, b"GET /health HTTP/1.0\r\n\r\n")  # no Host at all
    assert response.startswith(b"HTTP/1.1 400")
    # Content-Length over the limit: refused at once, and the server closes the connection (else the
    # read would time out)
    response, _ = raw_http(port, post_head(extra=b"Content-Length: 1000000000000\r\n", close=False) + b'{"model":')
    assert response.startswith(b"HTTP/1.1 413") and b"request_too_large" in response
    # a chunked body without a length: the server stops at the limit, not at the end (64 MiB here)
    piece = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    response, sent = raw_http(port, post_head(extra=b"Transfer-Encoding: chunked\r\n"), [piece] * 1024)
    assert response.startswith(b"HTTP/1.1 413") and b"request_too_large" in response
    assert sent < 16 * MAX_BODY_BYTES  # (kernel buffers hold a few MiB more than the server read)
    response, _ = raw_http(port, post_head(extra=b"Content-Length: %d\r\n" % len(body)) + body)
    assert response.startswith(b"HTTP/1.1 200")  # and the server is still fine


@pytest.mark.slow
def test_hostile_requests_with_the_openai_client(tiny_server):
    import openai

    url, _ = tiny_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(trust_env=False, timeout=60))
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x" * 20_000_000}])
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    for extra, param in [({"temperature": "0.5"}, "temperature"), ({"max_tokens": 1.5}, "max_tokens"),
                         ({"stream": "yes"}, "stream"), ({"seed": 2**64}, "seed"), ({"max_tokens": 10**6}, "max_tokens")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_ID, messages=hello, extra_body=extra)
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):  # refused before the stream starts
        client.chat.completions.create(model=MODEL_ID, messages=hello, seed=2**64, stream=True)
    greedy = client.chat.completions.create(model=MODEL_ID, messages=hello, temperature=0, max_tokens=8)
    tiny_t = client.chat.completions.create(model=MODEL_ID, messages=hello, temperature=1e-40, seed=1, max_tokens=8)
    assert tiny_t.choices[0].message.content == greedy.choices[0].message.content
