"""Tool calls and structured output in the course server: the parts of a request that a grammar decodes.

utils.serving (lesson 11) answers plain chat requests; lesson 16 adds `tools` / `tool_choice` and
`response_format` {"type": "json_schema"}. What those add lives here, so the server reads as before:

* `GrammarCache`: the grammar a request's reply must follow (utils.tool_calls.tool_call_grammar or
  utils.json_schema_grammar.json_schema_grammar), compiled once per set of tools: an agent sends the
  same tools on every turn, and compiling walks the whole vocabulary.
* `constrained_tokens`: lesson 06's decoding loop for a batch of one, where each step may only pick a
  token the grammar allows (lesson 07's constrained decoding). Where the grammar allows exactly one
  token (`<tool_call>{"name": "`, `"}}</tool_call>`) it is appended without asking the model
  ("jump-forward" decoding, as in SGLang): the model reads those tokens together at its next step.
* `PrefixCache`: the keys and values of the last requests, so that a request that starts with the same
  tokens (every request that offers an agent's tools starts with the same system prompt and tool
  descriptions) does not read them again: vLLM's automatic prefix caching, in miniature.
* `reply_stops`: the stop strings a free-text reply gets after tool results. The conversation shows
  the model `<tool_result ...>` turns (utils.tool_calls.render_messages); a small model tends to copy
  the last one as its answer. A reply never needs to contain a tool result, so the tag is a stop string:
  an echo ends there and is never sent.
* `tool_deltas`: a reply that grows piece by piece -> OpenAI stream deltas, content or one tool call.
"""

from __future__ import annotations

import copy
import json
import threading
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


class PrefixCache:
    """Keys and values of the last few requests, for a request that starts with the same tokens.

    lookup(ids) -> (a private copy of the cache cut to the longest stored prefix of ids, its length),
    or (None, 0); store(ids, cache) after a request (cache holds exactly the keys and values of ids).
    Only transformers caches (they can be cut with crop). The keys and values belong to the weights that
    computed them: change the weights (merge an adapter) and start a new server, with a new cache.
    Example: past, n = prefix_cache.lookup(ids)
    """

    def __init__(self, max_entries: int = 2, min_tokens: int = 32):
        self.max_entries, self.min_tokens = max_entries, min_tokens  # a shorter match is not worth a copy
        self.entries: list[tuple[list[int], object]] = []  # (token ids, cache), newest last
        self.lock = threading.Lock()  # requests run in the server's worker threads
        self.hits = self.reused_tokens = 0

    def lookup(self, ids: list[int]):
        with self.lock:
            best, n = None, 0
            for tokens, past in self.entries:
                same = 0
                for a, b in zip(tokens, ids):
                    if a != b:
                        break
                    same += 1
                if same > n:
                    best, n = past, same
            n = min(n, len(ids) - 1)  # the last prompt token is always fed: its logits pick the first token
            if best is None or n < self.min_tokens:
                return None, 0
            past = copy.deepcopy(best)  # the request appends to its copy; the stored one stays as it is
            self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + n
        if past.get_seq_length() > n:
            past.crop(n - past.get_seq_length())  # a negative count removes that many tokens
        return past, n

    def store(self, ids: list[int], past) -> None:
        if past is None or not hasattr(past, "crop") or past.get_seq_length() != len(ids):
            return
        with self.lock:
            kept = [e for e in self.entries if e[0] != ids] + [(ids, past)]
            self.entries = kept[len(kept) - self.max_entries:] if self.max_entries > 0 else []  # newest kept


@torch.inference_mode()  # no autograd graph: without it every request kept its activations until it ended
def constrained_tokens(model, input_ids, max_tokens, temperature, top_p, eos, generator, grammar,
                       prefix_cache: PrefixCache | None = None):
    """stream_tokens for a batch of one under a grammar: yields the next token id (1,) per step; each
    step may only pick a token grammar.allowed(state) permits (lesson 07's constrained decoding).

    A token the grammar forces (the only one allowed) costs no forward pass: it joins the tokens the
    model reads at its next step. The tokens are the same as step by step under greedy decoding (a
    seeded sample may differ: fewer random draws are made). prefix_cache: start from the keys and
    values of an earlier request with the same first tokens, and leave this one's there at the end.
    """
    next_logits = NextTokenLogits(model, True, max_positions(model))
    if prefix_cache is not None and next_logits.hf:  # start from the keys and values of an earlier request
        next_logits.cache, next_logits.cached = prefix_cache.lookup(input_ids[0].tolist())
    ids, state = input_ids, grammar.start()
    try:
        for _ in range(max_tokens):
            allowed = grammar.allowed(state)
            if allowed[grammar.eos]:  # the grammar's end-of-sequence stands for all of the model's eos ids
                allowed = allowed.clone()
                allowed[grammar.eos] = False
                if not allowed.any():  # only the end is allowed: finish without a forward pass
                    yield torch.tensor([min(eos)])
                    return
                allowed[list(eos)] = True
            choices = allowed.nonzero()
            if len(choices) == 1 and int(choices[0, 0]) not in eos:  # forced: jump forward
                token = choices[0]  # (1,)
            else:
                logits = next_logits(ids).float()  # (1, V)
                keep = torch.zeros(logits.shape[1], dtype=torch.bool)  # the model's vocabulary may be padded
                keep[: allowed.shape[0]] = allowed
                logits[0, ~keep] = float("-inf")
                token = sample_next_token(logits, temperature, top_p=top_p, generator=generator)  # (1,)
            state = grammar.advance(state, grammar.eos if int(token[0]) in eos else int(token[0]))
            ids = torch.cat([ids, token[:, None]], dim=1)
            yield token
            if int(token[0]) in eos:
                return
    finally:  # also when the caller stops early (a stop string, a client that went away)
        if prefix_cache is not None and next_logits.hf and ids.shape[1] <= next_logits.window:  # not slid
            prefix_cache.store(ids[0, :next_logits.cached].tolist(), next_logits.cache)


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
