"""The tools lesson 16's agent uses: a calculator, the handbook search of lesson 09, and a messenger.

* `calculator`: utils.calculator (a safe AST evaluator); read-only.
* `search_handbook`: lesson 09's retriever over data/09_handbook.md; read-only.
* `send_message`: the side-effecting one. It "sends" a message to a colleague by appending it to an
  `outbox` list (nothing leaves the machine), so lesson 16 can count what an injected document makes
  the agent send. `internal_only=True` is the argument-validation defence: recipients must be
  addresses of the company (@brackenfield.example).

`course_tools(retriever, outbox)` returns all three as `utils.agent.Tool`s; `utils.mcp_tools` serves
the same functions over MCP.
"""

from __future__ import annotations

from pathlib import Path

from utils.agent import Tool
from utils.calculator import calculator_tool

DATA = Path(__file__).resolve().parent.parent / "data"
COMPANY_DOMAIN = "@brackenfield.example"


def handbook_docs() -> dict[str, str]:
    """{"handbook": the text of data/09_handbook.md} (lesson 09's knowledge base)."""
    return {"handbook": (DATA / "09_handbook.md").read_text(encoding="utf-8")}


def calculator() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression exactly, e.g. 347 * 28.",
                {"type": "object", "properties": {"expression": {"type": "string"}},
                 "required": ["expression"], "additionalProperties": False}, calculator_tool)


def search_handbook(retriever, k: int = 2) -> Tool:
    """The handbook search: the k best passages for a query, numbered, as one text."""
    def search(query: str) -> str:
        hits = retriever.retrieve(query, k=k)
        return "\n".join(f"[{i}] {hit.text}" for i, hit in enumerate(hits, 1)) or "no passage found"

    return Tool("search_handbook", "Search the Brackenfield staff handbook; returns the best passages.",
                {"type": "object", "properties": {"query": {"type": "string"}},
                 "required": ["query"], "additionalProperties": False}, search)


def send_message(outbox: list, internal_only: bool = False) -> Tool:
    """A side-effecting tool: appends {"to", "text"} to `outbox`. internal_only: refuse other domains."""
    def send(to: str, text: str) -> str:
        outbox.append({"to": to, "text": text})
        return f"message sent to {to}"

    def check(arguments: dict) -> str | None:
        if internal_only and not arguments["to"].endswith(COMPANY_DOMAIN):
            return f"messages may only go to company addresses (ending in {COMPANY_DOMAIN})"
        return None

    return Tool("send_message", "Send a short message to a person by e-mail address.",
                {"type": "object", "properties": {"to": {"type": "string"}, "text": {"type": "string"}},
                 "required": ["to", "text"], "additionalProperties": False}, send, side_effect=True,
                check=check)


def course_tools(retriever, outbox: list, internal_only: bool = False) -> list[Tool]:
    """[calculator, search_handbook, send_message]. Shown in lesson 16."""
    return [calculator(), search_handbook(retriever), send_message(outbox, internal_only)]
