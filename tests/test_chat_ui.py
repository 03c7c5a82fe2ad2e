"""utils.chat_ui: the chat page over the course server, and the same page driven by a real browser.

Fast tests run `chat_reply` (what the page does with each message) against the course server with
scripted stand-in models (tests/standin.py), through the official openai client: the streamed text,
the visible tool call and the history Gradio passes in are checked exactly. The slow test starts the
page for real and a headless Chromium (Debian's `chromium`, driven by Playwright) types a question
and waits for the streamed answer; it is skipped, with the install command, where gradio, playwright
or /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.lab_browser import browser_missing
from tests.standin import tiny_chat_model
from tests.test_agent import SequenceClient, TurnScripts
from tests.test_serving import ScriptedLM, make_client
from utils.chat_ui import INSTALL_HINT, chat_reply, message_text, start_chat_ui, without_tool_lines
from utils.course_tools import calculator
from utils.server_process import port_is_open
from utils.tool_calls import format_tool_call

ANSWER = "Paris is the capital of France."
CALL = format_tool_call("calculator", {"expression": "347 * 28"})
SHOWN_CALL = 'tool: `calculator({"expression": "347 * 28"})` -> 9716'  # markdown: the call as code


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_model()[1]


@pytest.fixture(autouse=True)
def roomy_context(monkeypatch):  # the tool descriptions need more than the stand-in's 512 positions
    import utils.serving as serving

    real = serving.max_positions
    monkeypatch.setattr(serving, "max_positions", lambda model: max(real(model), 4096))


class RecordingClient(SequenceClient):
    """SequenceClient that keeps the messages of every request."""

    def __init__(self, tokenizer, texts):
        super().__init__(tokenizer, texts)
        self.requests = []

    def create(self, **kwargs):
        self.requests.append(kwargs["messages"])
        return super().create(**kwargs)


def test_message_text_and_tool_lines():
    assert message_text({"role": "user", "content": "hi"}) == "hi"
    assert message_text({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == "ab"
    assert message_text({"role": "user", "content": [{"type": "file", "file": {"path": "x.png"}}]}) == ""
    assert without_tool_lines(SHOWN_CALL + "\n\nIt is 9716.") == "It is 9716."
    assert without_tool_lines("No tool here.\n\nTwo paragraphs.") == "No tool here.\n\nTwo paragraphs."


def test_chat_reply_streams_the_answer(tokenizer):
    import openai

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0,
                           http_client=make_client(ScriptedLM(tokenizer, ANSWER), tokenizer))
    pieces = list(chat_reply(client, "Capital of France?", [], tools=[]))
    assert pieces[-1] == ANSWER and len(pieces) > 5  # streamed: the text grows piece by piece
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))


def test_chat_reply_shows_the_tool_call_then_the_answer(tokenizer):
    client = RecordingClient(tokenizer, [CALL, "It is 9716."])
    pieces = list(chat_reply(client, "What is 347 * 28?", [], tools=[calculator()]))
    assert SHOWN_CALL + "\n\n" in pieces  # the call is shown before any of the answer arrives
    assert pieces[-1] == SHOWN_CALL + "\n\nIt is 9716."
    second = client.requests[1]  # the tool's result went back to the model as a role "tool" message
    assert second[-2]["tool_calls"][0]["function"]["name"] == "calculator" and second[-1] == \
        {"role": "tool", "tool_call_id": second[-2]["tool_calls"][0]["id"], "content": "9716"}


def test_chat_reply_sends_gradio_history_without_the_shown_tool_lines(tokenizer):
    client = RecordingClient(tokenizer, ["Yes."])
    history = [{"role": "user", "content": [{"type": "text", "text": "What is 347 * 28?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": SHOWN_CALL + "\n\nIt is 9716."}]}]
    assert list(chat_reply(client, "Sure?", history, tools=[calculator()]))[-1] == "Yes."
    sent = [(m["role"], m["content"]) for m in client.requests[0][1:]]  # after the system prompt
    assert sent == [("user", "What is 347 * 28?"), ("assistant", "It is 9716."), ("user", "Sure?")]


def test_start_chat_ui_refuses_other_hosts_and_bad_ports():
    with pytest.raises(ValueError, match="loopback"):
        start_chat_ui("http://127.0.0.1:1/v1", host="0.0.0.0")
    with pytest.raises(TypeError, match="port"):
        start_chat_ui("http://127.0.0.1:1/v1", port="7860")
    with pytest.raises(ValueError, match="base_url"):
        start_chat_ui("  ")
    with pytest.raises(ValueError, match="tool_choice"):
        start_chat_ui("http://127.0.0.1:1/v1", [calculator()], tool_choice="search_web")


@pytest.mark.slow
def test_the_page_answers_in_a_real_browser(tokenizer):
    if browser_missing(("gradio", "playwright"), INSTALL_HINT):
        pytest.skip(browser_missing(("gradio", "playwright"), INSTALL_HINT))
    from utils.chat_ui import ask_in_browser
    from utils.serving import create_app, serve_in_thread

    threads_before = set(threading.enumerate())
    server = serve_in_thread(create_app(TurnScripts(tokenizer, [CALL, "It is 9716."]), tokenizer))
    ui = start_chat_ui(server.base_url, [calculator()])
    try:
        assert ui.url.startswith("http://127.0.0.1:") and ui.running()
        reply, png = ask_in_browser(ui.url, "What is 347 * 28?", timeout_s=120)
    finally:
        ui.stop()
        server.stop()
    # the page showed the tool call and the streamed answer, as the browser rendered them
    assert reply.strip() == SHOWN_CALL.replace("`", "") + "\n\nIt is 9716."  # the browser shows the code, no backticks
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    if os.environ.get("CHAT_PAGE_SCREENSHOT"):  # lesson 16 shows this screenshot: refresh it with this variable
        Path(os.environ["CHAT_PAGE_SCREENSHOT"]).write_bytes(png)
    # everything it started is stopped: the port is closed and no thread is left behind
    assert not ui.running() and not port_is_open("127.0.0.1", ui.port)
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - threads_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(threading.enumerate()) <= threads_before, set(threading.enumerate()) - threads_before
