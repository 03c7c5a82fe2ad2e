"""Tool calls and structured output in the course server: the parts of a request that a grammar decodes.

utils.serving (lesson 11) answers plain chat requests; lesson 16 adds `tools` / `tool_choice` and
`response_format` {"type": "json_schema"}. What those add lives here, so the server reads as before:

* `GrammarCache`: the grammar a request's reply must follow (utils.tool_calls.tool_call_grammar or
  utils.json_schema_grammar.json_schema_grammar), compiled once per set of tools: an agent sends the
  same tools on every turn, and compiling walks the whole vocabulary.
* `constrained_tokens`: lesson 06's decoding loop for a batch of one, where each step may only pick a
  token the grammar allows (lesson 07's constrained decoding).
* `reply_stops`: the stop strings a free-text reply gets after tool results. The conversation shows
  the model `<tool_result ...>` turns (utils.tool_calls.render_messages); a small model tends to copy
  the last one as its answer. A reply never needs to contain a tool result, so the tag is a stop string:
  an echo ends there and is never sent.
* `tool_deltas`: a reply that grows piece by piece -> OpenAI stream deltas, content or one tool call.
"""

from __future__ import annotations

import json
from typing import Iterator

import torch

from utils.json_schema_grammar import json_schema_grammar
from utils.sampling import NextTokenLogits, max_positions, sample_next_token
from utils.tool_calls import CALL_OPEN, RESULT_OPEN, ToolCallStream, tool_call_grammar

MAX_CACHED_GRAMMARS = 16


class GrammarCache:
    """grammar_cache.grammar_for(settings) -> the grammar of a request's reply, or None for free text.

    settings: what utils.chat_request.validate_request returns (tools, tool_choice, answer_schema).
    Keeps the last MAX_CACHED_GRAMMARS compiled grammars (oldest dropped first).
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.grammars = tokenizer, {}

    def grammar_for(self, settings: dict):
        tools, schema = settings["tools"], settings["answer_schema"]
        if tools is None and schema is None:
            return None
        key = json.dumps([tools, settings["tool_choice"], schema])
        if key not in self.grammars:
            if len(self.grammars) >= MAX_CACHED_GRAMMARS:
                self.grammars.pop(next(iter(self.grammars)))
            self.grammars[key] = (json_schema_grammar(self.tokenizer, schema) if tools is None else
                                  tool_call_grammar(self.tokenizer, tools, settings["tool_choice"], schema))
        return self.grammars[key]


def reply_stops(settings: dict) -> list[str]:
    """The request's stop strings, plus the course's tool tags where a free-text reply must not copy them.

    After a tool result, `<tool_result` stops the reply; with tool_choice "none", `<tool_call` too (a
    call is not allowed, so its text is not an answer). Example: no tool messages -> settings["stop"].
    """
    stops = list(settings["stop"])
    if any(m["role"] == "tool" for m in settings["messages"]):
        stops.append(RESULT_OPEN)
        if settings["tool_choice"] == "none":
            stops.append(CALL_OPEN)
    return stops


@torch.inference_mode()  # no autograd graph: without it every request kept its activations until it ended
def constrained_tokens(model, input_ids, max_tokens, temperature, top_p, eos, generator, grammar):
    """stream_tokens for a batch of one under a grammar: yields the next token id (1,) per step; each
    step may only pick a token grammar.allowed(state) permits (lesson 07's constrained decoding)."""
    next_logits = NextTokenLogits(model, True, max_positions(model))
    ids, state = input_ids, grammar.start()
    for _ in range(max_tokens):
        logits = next_logits(ids).float()  # (1, V)
        allowed = grammar.allowed(state)
        if allowed[grammar.eos]:  # the grammar's end-of-sequence stands for all of the model's eos ids
            allowed = allowed.clone()
            allowed[list(eos)] = True
        keep = torch.zeros(logits.shape[1], dtype=torch.bool)  # the model's vocabulary may be padded
        keep[: allowed.shape[0]] = allowed
        logits[0, ~keep] = float("-inf")
        token = sample_next_token(logits, temperature, top_p=top_p, generator=generator)  # (1,)
        state = grammar.advance(state, grammar.eos if int(token[0]) in eos else int(token[0]))
        ids = torch.cat([ids, token[:, None]], dim=1)
        yield token
        if int(token[0]) in eos:
            return


def tool_deltas(pieces, call_id: str) -> Iterator[tuple[dict, str | None, int]]:
    """(text piece, finish_reason, tokens) from utils.serving.stream_text -> (delta, finish_reason,
    tokens) as OpenAI streams a reply to a request with tools: plain content, or one tool call whose
    name comes first and whose arguments follow as they grow (utils.tool_calls.ToolCallStream)."""
    splitter, first = ToolCallStream(call_id), True
    for piece, finish_reason, n in pieces:
        for delta in splitter.feed(piece, final=finish_reason is not None):
            if first:  # the first delta carries the role (and, for a call, content null)
                delta = {"role": "assistant", **({"content": None} if "tool_calls" in delta else {}), **delta}
                first = False
            yield delta, None, n
        if finish_reason:
            if first:
                yield {"role": "assistant", "content": ""}, None, n
            yield {}, "tool_calls" if splitter.is_call() else finish_reason, n
