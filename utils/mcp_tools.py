"""The course's tools over MCP (the Model Context Protocol), with the official `mcp` SDK. Shown in lesson 16.

MCP standardises the tool side of an agent: a *server* lists tools (name, description, JSON Schema of
the arguments) and runs them; any *client* (an IDE, a desktop app, our agent) can discover and call
them without knowing how they are written. Here:

* `build_mcp_server(tools)` -> an `mcp.server.MCPServer` serving `utils.agent.Tool`s (the SDK derives
  each input schema from the function's signature);
* `python -m utils.mcp_tools` serves the course tools (calculator, search_handbook, send_message into
  a throw-away outbox) over stdio: the client starts it as a child process and talks JSON-RPC over
  its stdin/stdout, so nothing listens on the network;
* `MCPConnection(server)`: the SDK's client held open on a background event loop, so the synchronous
  agent loop can use it; `.agent_tools()` turns the listed tools into `Tool`s for `utils.agent.run_agent`,
  each call going through MCP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import tempfile
import threading
from pathlib import Path

from utils.agent import Tool


def build_mcp_server(tools: list[Tool]):
    """An MCPServer named "llm-course-tools" that lists and runs `tools`."""
    from mcp.server import MCPServer

    server = MCPServer("llm-course-tools")
    for tool in tools:
        server.add_tool(tool.function, name=tool.name, description=tool.description, structured_output=False)
    return server


def stdio_parameters():
    """How an MCP client starts this module's server: `python -m utils.mcp_tools` in the repo root."""
    from mcp.client.stdio import StdioServerParameters

    from utils.server_process import REPO_ROOT

    return StdioServerParameters(command=sys.executable, args=["-m", "utils.mcp_tools"], cwd=str(REPO_ROOT),
                                 env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                      "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})


def result_text(result) -> str:
    """The text of an MCP CallToolResult (its text parts joined); an error result as "error: ..."."""
    text = "".join(part.text for part in result.content if getattr(part, "type", "") == "text")
    return f"error: {text}" if result.is_error and not text.startswith("error") else text


class MCPConnection:
    """A synchronous handle on an MCP client session (the SDK is async; the agent loop is not).

    An event loop runs on a background thread and holds the session open; `.tools` is what the server
    lists, `.call(name, arguments)` -> text, `.close()` ends the session (and a stdio server child).
    Example: with MCPConnection(stdio_parameters()) as mcp: mcp.call("calculator", {"expression": "2+2"})
    """

    def __init__(self, server, timeout: float = 120.0):
        from mcp import Client, StdioServerParameters
        from mcp.client.stdio import stdio_client

        if isinstance(server, StdioServerParameters):
            # the child's stderr goes to a real file: a notebook's sys.stderr has no file descriptor
            self.errlog = tempfile.NamedTemporaryFile("w", prefix="mcp-server-", suffix=".log", delete=False)
            server = stdio_client(server, errlog=self.errlog)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="mcp-client")
        self.thread.start()
        self.client, self.closing = Client(server), None
        ready = concurrent.futures.Future()

        async def hold():  # enters and leaves the client's context in one task, as anyio requires
            self.closing = asyncio.Event()
            try:
                async with self.client:
                    ready.set_result((await self.client.list_tools()).tools)
                    await self.closing.wait()
            except BaseException as err:
                if not ready.done():
                    ready.set_exception(err)
                raise

        self.holder = asyncio.run_coroutine_threadsafe(hold(), self.loop)
        try:
            self.tools = ready.result(timeout)
        except BaseException:
            self.close()
            raise

    def call(self, name: str, arguments: dict) -> str:
        return result_text(asyncio.run_coroutine_threadsafe(self.client.call_tool(name, arguments), self.loop).result())

    def agent_tools(self, side_effects=("send_message",)) -> list[Tool]:
        """The listed tools as utils.agent Tools whose calls go through this connection."""
        made = []
        for t in self.tools:
            def function(_name=t.name, **arguments):
                return self.call(_name, arguments)
            made.append(Tool(t.name, t.description or "", dict(t.input_schema), function,
                             side_effect=t.name in side_effects))
        return made

    def close(self) -> None:
        """End the session (a stdio server child exits) and the loop thread. Safe to call twice."""
        if self.closing is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.closing.set)
            try:
                self.holder.result(30)
            except BaseException:
                pass
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        errlog = getattr(self, "errlog", None)
        if errlog is not None and not errlog.closed:
            errlog.close()
            Path(errlog.name).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main() -> None:
    from utils.course_tools import course_tools, handbook_docs
    from utils.minilm import load_minilm
    from utils.rag import build_retriever

    class LazyRetriever:  # the embedder loads on the first search, not when the server starts
        # MiniLM from scratch, not sentence-transformers: same vectors, ~0.3 GB less for this process
        retriever = None

        def retrieve(self, query, k=5):
            if self.retriever is None:
                self.retriever = build_retriever(handbook_docs(), embedder=load_minilm())
            return self.retriever.retrieve(query, k=k)

    build_mcp_server(course_tools(LazyRetriever(), outbox=[])).run("stdio")


if __name__ == "__main__":
    main()
