"""A chat web page over the course server, with visible tool calls (Gradio). Shown in lesson 16.

`start_chat_ui(base_url, tools)` serves a Gradio `ChatInterface` on 127.0.0.1 only and returns a handle
with `.url` and `.stop()`. Each message goes to the course server (utils.serving) through the official
`openai` client with the tools offered; the answer streams into the page, and a tool call shows as a
line "tool: `name(arguments)` -> result" before the answer that uses it.

The page runs on a thread of the calling process (the notebook kernel): the tools (the handbook
search holds lesson 09's retriever) and the server's model stay one copy in memory, and Gradio costs
about 150 MB and 4 CPU-seconds to import. `stop()` ends that thread (and closes the HTTP client).

`ask_in_browser(url, question)` is how a test (or the notebook) checks the page for real: a headless
Chromium (Debian's `chromium`, driven by Playwright) types the question, waits until the streamed
reply is complete, and returns the reply's text and a PNG screenshot.

On Colab the page stays on the Colab machine: open it with
`google.colab.output.serve_kernel_port_as_window(ui.port)` (a link through Colab's port proxy).

Needs the pinned `gradio` package, and `playwright` + `/usr/bin/chromium` for `ask_in_browser`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os

from utils.agent import AGENT_SYSTEM, run_tool
from utils.checks import check_int, check_number, check_text
from utils.server_process import check_loopback, free_port

TOOL_LINE = "tool: "  # how a tool call starts in the page: "tool: `calculator({...})` -> 9716"
CHROMIUM = "/usr/bin/chromium"  # Debian's package: `apt-get install chromium` (Playwright's own download is not used)
INSTALL_HINT = "pip install gradio==6.31.0 playwright==1.65.2; apt-get install -y chromium"


def message_text(message: dict) -> str:
    """The text of one chat message, whether its content is a string or Gradio's list of parts.

    Example: {"role": "user", "content": [{"type": "text", "text": "hi"}]} -> "hi".
    """
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part if isinstance(part, str) else part.get("text", "")
                       for part in content if isinstance(part, (str, dict)))
    return ""


def without_tool_lines(reply: str) -> str:
    """The answer part of a shown reply: the "tool: ..." lines are for the reader, not the model.

    Example: "tool: `calculator({...})` -> 4\\n\\nIt is 4." -> "It is 4."
    """
    kept = [block for block in reply.split("\n\n") if not block.startswith(TOOL_LINE)]
    return "\n\n".join(kept).strip()


def is_json(text: str) -> bool:
    """Example: '{"a": 1}' -> True; '{"a": ' -> False."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def chat_reply(client, message: str, history: list[dict], tools, model: str = "SmolLM2-135M-Instruct",
               max_tokens: int = 96, tool_choice: str = "auto"):
    """Yield the growing text of the reply to `message`: at most one tool call (shown), then the answer.

    history: the earlier turns as Gradio passes them ({"role", "content"} dicts, content a string or
    a list of text parts). tool_choice: of the first model call ("auto", "required" or a tool name);
    the second call, after a tool ran, uses "none". Example: list(chat_reply(client, "Hi", [], []))[-1] -> "Hello!..."
    """
    messages = [{"role": "system", "content": AGENT_SYSTEM}]
    for turn in history:
        if turn.get("role") == "user":
            messages.append({"role": "user", "content": message_text(turn)})
        elif turn.get("role") == "assistant":
            messages.append({"role": "assistant", "content": without_tool_lines(message_text(turn))})
    messages.append({"role": "user", "content": message})
    by_name = {t.name: t for t in tools}
    shown = ""
    for choice in (tool_choice, "none"):  # one tool call at most, then an answer
        if choice not in ("auto", "none", "required"):  # a tool's name: the API's form for "call this one"
            choice = {"type": "function", "function": {"name": choice}}
        kwargs = {"tools": [t.spec() for t in tools], "tool_choice": choice} if tools else {}
        stream = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                max_tokens=max_tokens, stream=True, **kwargs)
        text, call = "", None
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is None:
                continue
            if delta.tool_calls:  # the first piece names the tool, later pieces add to the arguments
                piece = delta.tool_calls[0]
                call = call or {"id": piece.id, "name": piece.function.name, "arguments": ""}
                call["arguments"] += piece.function.arguments or ""
            elif delta.content:
                text += delta.content
                yield shown + text
        if call is None or not tools:
            return
        if not is_json(call["arguments"]):  # cut off by max_tokens: the server would refuse it back
            yield shown + f"{TOOL_LINE}`{call['name']}({call['arguments']}...)` -> error: the call was cut off"
            return
        step = run_tool(by_name.get(call["name"]), call["name"], call["arguments"])
        shown += f"{TOOL_LINE}`{call['name']}({call['arguments']})` -> {step.result}\n\n"  # `code`: no markdown inside
        yield shown
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": step.result})


class ChatUI:
    """Handle on a running chat page: .url, .port, .stop() (also as a `with` block)."""

    def __init__(self, demo, host: str, port: int, own_http_client=None):
        self.demo, self.host, self.port = demo, host, port
        self.own_http_client = own_http_client  # the client start_chat_ui made (closed by stop)
        self.url = f"http://{host}:{port}/"

    def running(self) -> bool:
        return bool(self.demo.is_running)

    def stop(self) -> None:
        """Close the page's server thread (and the HTTP client start_chat_ui made). Safe to call twice."""
        self.demo.close(verbose=False)
        if self.own_http_client is not None:
            self.own_http_client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"ChatUI({self.url}, {'running' if self.running() else 'stopped'})"


def start_chat_ui(base_url: str, tools=(), port: int | None = None, host: str = "127.0.0.1",
                  tool_choice: str = "auto", http_client=None) -> ChatUI:
    """Serve the chat page on host:port (loopback only) on a background thread; returns a ChatUI.

    base_url: the course server's OpenAI base URL (e.g. server.base_url, ".../v1"). tools: utils.agent
    Tools the model may call. tool_choice: of each message's first model call ("auto", "none",
    "required" or a tool's name; "required" makes a 135M model use a tool, see lesson 16).
    http_client: an httpx.Client for the openai client (tests pass one).
    Example: ui = start_chat_ui(server.base_url, tools); print(ui.url); ui.stop()
    """
    check_text("base_url", base_url)
    check_loopback(host)  # before the 4-second import, so a wrong host fails at once
    port = free_port(host) if port is None else check_int("port", port, low=1, high=65535)
    tools = list(tools)
    if tool_choice not in ("auto", "none", "required") and tool_choice not in [t.name for t in tools]:
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or one of the tools' names "
                         f"{[t.name for t in tools]}, got {tool_choice!r}")
    import gradio as gr
    import httpx
    import openai

    # trust_env=False: a proxy from the environment cannot reach this machine's 127.0.0.1
    own_http_client = None if http_client is not None else httpx.Client(trust_env=False, timeout=300)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           http_client=http_client or own_http_client)

    def respond(message, history):
        yield from chat_reply(client, message, history, tools, tool_choice=tool_choice)

    demo = gr.ChatInterface(respond, title="llm-course chat (SmolLM2-135M)", analytics_enabled=False)
    # share=False: no public tunnel (Gradio would open one by default on Colab); inline=False: no iframe
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False, inline=False,
                quiet=True, ssr_mode=False)
    return ChatUI(demo, host, port, own_http_client)


def _drive_browser(url: str, question: str, timeout_s: float) -> tuple[str, bytes]:
    from playwright.sync_api import sync_playwright

    # one process instead of ~9 roughly halves Chromium's memory (~650 MB instead of ~1.2 GB of RSS)
    args = ["--single-process", "--disable-gpu", "--disable-extensions"]
    timeout_ms = timeout_s * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(url, timeout=timeout_ms)
            box = page.get_by_role("textbox").first
            box.fill(question)
            box.press("Enter")
            # done = a reply is shown, the box accepts input again and the Stop button is gone
            page.wait_for_function(
                """() => document.querySelector('[data-testid=bot]')
                         && !document.querySelector('textarea').disabled
                         && !document.querySelector('button.stop-button')""", timeout=timeout_ms)
            reply = page.locator("[data-testid=bot]").last.inner_text()
            return reply, page.screenshot()
        finally:
            browser.close()


def ask_in_browser(url: str, question: str, timeout_s: float = 120.0) -> tuple[str, bytes]:
    """Type `question` into the chat page at `url` in a headless Chromium; return (reply text, PNG).

    Works from a notebook too: Playwright's synchronous API refuses to run where an asyncio loop is
    running (a Jupyter kernel), so it then runs on a worker thread. Needs playwright and /usr/bin/chromium.
    Example: reply, png = ask_in_browser(ui.url, "What is 347 * 28?")
    """
    check_text("url", url)
    check_text("question", question)
    check_number("timeout_s", timeout_s, low=1)
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"no browser at {CHROMIUM}: {INSTALL_HINT}")
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here (a script, pytest): drive the browser directly
        return _drive_browser(url, question, timeout_s)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_drive_browser, url, question, timeout_s).result()
