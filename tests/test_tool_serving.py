"""Decoding under a grammar in the server: jump-forward over forced tokens, and the prefix cache.

Both are speed-ups that must not change a greedy reply: each test compares against a plain
step-by-step loop (a full forward pass over the whole sequence at every step, no cache at all).
"""

from __future__ import annotations

import pytest
import torch

from tests.standin import random_llama, tiny_tokenizer
from tests.test_tool_calls import TOOLS
from utils.tool_calls import render_messages, tool_call_grammar
from utils.tool_serving import PrefixCache, constrained_tokens


class CountingLM(torch.nn.Module):
    """Wraps a transformers model and records how many tokens each forward pass reads."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.fed = model, model.config, []
        self.generation_config = model.generation_config
        self.prepare_inputs_for_generation = model.prepare_inputs_for_generation  # "a transformers model"

    def forward(self, input_ids=None, **kwargs):
        self.fed.append(input_ids.shape[1])
        return self.inner(input_ids=input_ids, **kwargs)


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny_tokenizer()
    model = random_llama(tokenizer, seed=3)
    model.config.max_position_embeddings = 4096  # the tool descriptions are ~800 byte tokens
    grammar = tool_call_grammar(tokenizer, TOOLS, "required")
    return model, tokenizer, grammar


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    messages = render_messages([{"role": "user", "content": question}], TOOLS)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]  # (1, T)


@torch.inference_mode()
def step_by_step(model, ids, grammar, eos, max_tokens) -> list[int]:
    """The reference: re-read everything, mask, take the best allowed token; one pass per token."""
    state, out = grammar.start(), []
    for _ in range(max_tokens):
        logits = model(input_ids=ids).logits[0, -1].float()
        allowed = grammar.allowed(state).clone()
        if allowed[grammar.eos]:
            allowed[list(eos)] = True
        keep = torch.zeros(logits.shape[0], dtype=torch.bool)
        keep[: allowed.shape[0]] = allowed
        token = int(logits.masked_fill(~keep, float("-inf")).argmax())
        out.append(token)
        if token in eos:
            break
        state = grammar.advance(state, token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def decode(model, ids, grammar, eos, max_tokens=120, prefix_cache=None) -> list[int]:
    steps = constrained_tokens(model, ids, max_tokens, 0.0, None, eos, None, grammar, prefix_cache)
    return [int(t[0]) for t in steps]


def test_jump_forward_same_tokens_fewer_forward_passes(setup):
    model, tokenizer, grammar = setup
    eos = {tokenizer.eos_token_id}
    for question in ("Weather in Oslo?", "Add 2 and 40."):
        ids = prompt_ids(tokenizer, question)
        counting = CountingLM(model)
        tokens = decode(counting, ids, grammar, eos)
        assert tokens == step_by_step(model, ids, grammar, eos, 120)
        assert tokens[-1] in eos
        # forced tokens (`<tool_call>{"name": "` ...) are read in one pass with the next free token
        assert len(counting.fed) < len(tokens) / 2, (len(counting.fed), len(tokens))
        # the prompt with the forced `<tool_call>{"name": "` in one pass, then only new tokens (a forced
        # tail like `"}}</tool_call>` is never read at all)
        assert counting.fed[0] > ids.shape[1] and sum(counting.fed) <= ids.shape[1] + len(tokens) - 1


def test_a_grammar_that_allows_only_the_end_costs_no_forward_pass(setup):
    model, tokenizer, grammar = setup
    counting = CountingLM(model)
    only_end = type("OnlyEnd", (), {"eos": tokenizer.eos_token_id, "start": lambda self: 0,
                                    "allowed": lambda self, s: torch.nn.functional.one_hot(
                                        torch.tensor(tokenizer.eos_token_id), len(tokenizer)).bool()})()
    assert decode(counting, prompt_ids(tokenizer, "Hi"), only_end, {tokenizer.eos_token_id}) == [
        tokenizer.eos_token_id]
    assert counting.fed == []


def test_prefix_cache_reuses_the_shared_prompt_and_changes_nothing(setup):
    model, tokenizer, grammar = setup
    eos = {tokenizer.eos_token_id}
    first, second = prompt_ids(tokenizer, "Weather in Oslo?"), prompt_ids(tokenizer, "Weather in Bergen?")
    shared = next(i for i, (a, b) in enumerate(zip(first[0].tolist(), second[0].tolist())) if a != b)
    assert shared > 500  # the system prompt with the tool descriptions

    cache = PrefixCache()
    counting_first = CountingLM(model)
    reply_first = decode(counting_first, first, grammar, eos, prefix_cache=cache)
    assert (cache.hits, len(cache.entries)) == (0, 1)
    forced = counting_first.fed[0] - first.shape[1]  # `<tool_call>{"name": "`, read with the prompt
    counting = CountingLM(model)
    reply_second = decode(counting, second, grammar, eos, prefix_cache=cache)
    assert cache.hits == 1 and cache.reused_tokens == shared
    assert counting.fed[0] == second.shape[1] - shared + forced  # only the new part of the prompt is read
    assert reply_second == step_by_step(model, second, grammar, eos, 120)
    assert reply_first == step_by_step(model, first, grammar, eos, 120)

    # the same prompt again: the stored keys and values were not changed by the request that used them
    again = CountingLM(model)
    assert decode(again, second, grammar, eos, prefix_cache=cache) == reply_second
    assert again.fed[0] == 1 + forced  # all but the last prompt token came from the cache (its logits are needed)
    assert len(cache.entries) <= cache.max_entries


def test_prefix_cache_lookup_rules(setup):
    model, tokenizer, _ = setup
    cache = PrefixCache(max_entries=2, min_tokens=4)
    assert cache.lookup([1, 2, 3, 4, 5]) == (None, 0)  # empty
    ids = list(range(3, 13))
    with torch.inference_mode():
        past = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    cache.store(ids[:-1], past)  # the cache does not hold these ids: refused
    assert cache.entries == []
    cache.store(ids, past)
    assert cache.lookup(ids[:3] + [99, 98]) == (None, 0)  # 3 shared tokens < min_tokens
    got, n = cache.lookup(ids[:6] + [99])
    assert n == 6 and got.get_seq_length() == 6 and past.get_seq_length() == len(ids)
    got, n = cache.lookup(ids)  # the whole prompt cached: still feed the last token
    assert n == len(ids) - 1 and got.get_seq_length() == len(ids) - 1
    for k in range(3):  # newest kept, at most max_entries
        more = [50 + k] + ids[1:]
        with torch.inference_mode():
            cache.store(more, model(input_ids=torch.tensor([more]), use_cache=True).past_key_values)
    assert [e[0][0] for e in cache.entries] == [51, 52]
    for size, kept in [(1, [52]), (0, [])]:  # one entry, or none at all (caching off)
        cache.max_entries = size
        cache.store(more, cache.entries[-1][1] if cache.entries else past)
        assert [e[0][0] for e in cache.entries] == kept


def test_the_server_reuses_an_agents_shared_prompt_and_answers_the_same(setup):
    import openai
    from fastapi.testclient import TestClient

    from utils.serving import MODEL_ID, create_app

    model, tokenizer, _ = setup
    apps = [create_app(model, tokenizer), create_app(model, tokenizer)]
    clients = [openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", max_retries=0,
                             http_client=TestClient(app, base_url="http://127.0.0.1:8000")) for app in apps]
    apps[1].state.prefix_cache.max_entries = 0  # the second server never finds anything: plain decoding

    def turn(client, question, **extra):
        return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": question}],
                                              tools=TOOLS, temperature=0, max_tokens=300, **extra)

    for question, choice in [("Weather in Oslo?", "required"), ("Add 2 and 40.", "required"),
                             ("Weather in Oslo?", "auto")]:
        cached, plain = turn(clients[0], question, tool_choice=choice), turn(clients[1], question, tool_choice=choice)
        assert cached.choices[0].message.model_dump() == plain.choices[0].message.model_dump() or (
            cached.choices[0].message.tool_calls[0].function.model_dump()
            == plain.choices[0].message.tool_calls[0].function.model_dump())  # call ids are random
    assert apps[0].state.prefix_cache.hits == 2  # the 2nd and 3rd requests started from earlier tokens
    assert apps[0].state.prefix_cache.reused_tokens > 2 * 500
