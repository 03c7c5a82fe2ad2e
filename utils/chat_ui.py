"""A chat web page over the course server, with visible tool calls (Gradio). Shown in lesson 16.

`start_chat_ui(base_url, tools)` serves a Gradio `ChatInterface` on 127.0.0.1 only and returns a handle
with `.url` and `.stop()`. Each message goes to the course server (utils.serving) through the official
`openai` client with the tools offered; the answer streams into the page, and a tool call shows as a
line "tool: name(arguments) -> result" before the answer that uses it. On Colab, open the page with
`google.colab.output.serve_kernel_port_as_window(port)` (the page stays on the Colab machine).

Needs the pinned `gradio` package (an optional extra of the course).
"""

from __future__ import annotations

from utils.agent import AGENT_SYSTEM, run_tool
from utils.server_process import check_loopback, free_port


def chat_reply(client, message: str, history: list[dict], tools, model: str = "SmolLM2-135M-Instruct",
               max_tokens: int = 96):
    """Yield the growing text of the reply to `message`: at most one tool call (shown), then the answer."""
    messages = [{"role": "system", "content": AGENT_SYSTEM}]
    messages += [{"role": m["role"], "content": m["content"]} for m in history
                 if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)]
    messages.append({"role": "user", "content": message})
    by_name = {t.name: t for t in tools}
    shown = ""
    for choice in ("auto", "none"):  # one tool call at most, then an answer
        kwargs = {"tools": [t.spec() for t in tools], "tool_choice": choice} if tools else {}
        stream = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                max_tokens=max_tokens, stream=True, **kwargs)
        text, call = "", None
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is None:
                continue
            if delta.tool_calls:
                piece = delta.tool_calls[0]
                call = call or {"id": piece.id, "name": piece.function.name, "arguments": ""}
                call["arguments"] += piece.function.arguments or ""
            elif delta.content:
                text += delta.content
                yield shown + text
        if call is None or not tools:
            return
        step = run_tool(by_name.get(call["name"]), call["name"], call["arguments"])
        shown += f"tool: {call['name']}({call['arguments']}) -> {step.result}\n\n"
        yield shown
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": step.result})


class ChatUI:
    """Handle on a running chat page: .url, .stop()."""

    def __init__(self, demo, url: str):
        self.demo, self.url = demo, url

    def stop(self) -> None:
        self.demo.close()


def start_chat_ui(base_url: str, tools=(), port: int | None = None, host: str = "127.0.0.1", http_client=None) -> ChatUI:
    """Serve the chat page on host:port (loopback only) in a background thread; returns a ChatUI."""
    import gradio as gr
    import httpx
    import openai

    check_loopback(host)
    port = free_port(host) if port is None else port
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           http_client=http_client or httpx.Client(trust_env=False, timeout=300))
    tools = list(tools)

    def respond(message, history):
        yield from chat_reply(client, message, history, tools)

    demo = gr.ChatInterface(respond, title="llm-course chat (SmolLM2-135M)")
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    return ChatUI(demo, f"http://{host}:{port}/")
