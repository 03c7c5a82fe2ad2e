"""utils.chat_ui: the chat page, driven by a real headless Chromium (Playwright), over the course server.

Skipped, with the install command, where gradio, playwright or Debian's chromium is missing.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.standin import tiny_chat_model
from tests.test_serving import ScriptedLM, make_client

CHROMIUM = "/usr/bin/chromium"
ANSWER = "Paris is the capital of France."


def test_chat_reply_streams_the_answer():
    import openai

    from utils.chat_ui import chat_reply

    model, tokenizer = tiny_chat_model()
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0,
                           http_client=make_client(ScriptedLM(tokenizer, ANSWER), tokenizer))
    pieces = list(chat_reply(client, "Capital of France?", [], tools=[]))
    assert pieces[-1] == ANSWER and len(pieces) > 5  # streamed: the text grows piece by piece


@pytest.mark.slow
def test_the_page_answers_in_a_real_browser(tmp_path):
    missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
    if missing or not os.path.exists(CHROMIUM):
        pytest.skip(f"needs {missing or ''} and {CHROMIUM}: pip install gradio==6.31.0 playwright==1.65.2; "
                    "apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    from utils.chat_ui import start_chat_ui
    from utils.serving import create_app, serve_in_thread

    model, tokenizer = tiny_chat_model()
    server = serve_in_thread(create_app(ScriptedLM(tokenizer, ANSWER), tokenizer))
    ui = start_chat_ui(server.base_url)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page()
            page.goto(ui.url)
            box = page.get_by_role("textbox").first
            box.fill("What is the capital of France?")
            box.press("Enter")
            page.get_by_text(ANSWER).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "chat.png"))
            browser.close()
    finally:
        ui.stop()
        server.stop()
    assert (tmp_path / "chat.png").stat().st_size > 0
