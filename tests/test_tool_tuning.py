"""Teaching the tool choice (utils.tool_tuning): examples, the shared-prefix loss, training."""

from __future__ import annotations

import pytest
import torch

from tests.standin import random_llama, tiny_chat_model, tiny_tokenizer
from tests.test_tool_calls import TOOLS
from utils.lora import add_lora, answer_loss
from utils.tool_calls import CALL_OPEN, format_tool_call, parse_tool_call, render_messages, tool_call_grammar
from utils.tool_serving import constrained_tokens
from utils.tool_tuning import prefix_keys_values, shared_prefix_loss, trace_examples, train_tool_calls

SYSTEM = "You help with the weather and with sums."
TRACES = [
    {"request": "Weather in Oslo?", "tool": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}},
    {"request": "Add 2 and 40.", "tool": "add", "arguments": {"a": 2, "b": 40}},
    {"request": "Is it cold in Rome?", "tool": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}},
    {"request": "What is 7 plus 5?", "tool": "add", "arguments": {"a": 7, "b": 5}},
]


@pytest.fixture()
def tiny():
    model, tokenizer = tiny_chat_model(seed=1)
    model.config.max_position_embeddings = 4096  # the tool descriptions are ~800 byte tokens
    return model, tokenizer


def full_prompt(tokenizer, request: str) -> list[int]:
    messages = render_messages([{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}], TOOLS)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def test_trace_examples_split_the_shared_start_the_request_and_the_call(tiny):
    _, tokenizer = tiny
    prefix, rows, calls = trace_examples(tokenizer, TRACES, TOOLS, SYSTEM)
    opening = tokenizer.encode(CALL_OPEN + '{"name": "', add_special_tokens=False)
    for t, row, call in zip(TRACES, rows, calls):
        whole = prefix[0].tolist() + row
        assert whole == full_prompt(tokenizer, t["request"]) + opening  # exactly what the server renders
        text = CALL_OPEN + '{"name": "' + tokenizer.decode(call[:-1])
        assert text == format_tool_call(t["tool"], t["arguments"]) and call[-1] == tokenizer.eos_token_id
    assert prefix.shape[1] > 500 and all(len(r) < 60 for r in rows)  # the tool descriptions are shared
    _, _, names = trace_examples(tokenizer, TRACES, TOOLS, SYSTEM, name_only=True)
    assert [tokenizer.decode(c) for c in names] == [t["tool"] for t in TRACES]


@pytest.mark.parametrize("bad, message", [([], "empty"), ([{"request": "x", "tool": "add"}], "arguments")])
def test_trace_examples_refuse_bad_traces(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        trace_examples(tiny[1], bad, TOOLS, SYSTEM)


def test_shared_prefix_loss_is_the_loss_of_the_full_examples(tiny):
    model, tokenizer = tiny
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    for layer in [m for m in model.modules() if hasattr(m, "lora_B")]:
        torch.nn.init.normal_(layer.lora_B, std=0.5)  # adapters that change the output
    prefix, rows, calls = trace_examples(tokenizer, TRACES, TOOLS, SYSTEM)
    ours = shared_prefix_loss(model, prefix, rows, calls, pad=tokenizer.pad_token_id)
    width = max(prefix.shape[1] + len(r) + len(c) for r, c in zip(rows, calls))
    batch = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.full((len(rows), width), -100)
    for i, (r, c) in enumerate(zip(rows, calls)):
        ids = prefix[0].tolist() + r + c
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, len(ids) - len(c): len(ids)] = torch.tensor(c)
    with torch.no_grad():
        reference = answer_loss(model, batch)
    assert abs(float(ours) - float(reference)) < 1e-5
    past = prefix_keys_values(model, prefix)  # shared between calls: each call works on its own copy
    for _ in range(2):
        assert abs(float(shared_prefix_loss(model, prefix, rows, calls, tokenizer.pad_token_id, past))
                   - float(reference)) < 1e-5
    assert past.get_seq_length() == prefix.shape[1] and past.layers[0].keys.shape[0] == 1
    ours.backward()  # the gradient reaches the adapters through the examples' own tokens
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0
               for m in model.modules() if hasattr(m, "lora_A"))


def test_training_teaches_the_tool_and_changes_only_the_adapters():
    tokenizer = tiny_tokenizer()
    model = random_llama(tokenizer, seed=0)  # large random weights: adapters can move its choices quickly
    model.config.max_position_embeddings = 4096
    probe = torch.tensor([full_prompt(tokenizer, TRACES[1]["request"])])
    with torch.no_grad():
        base_logits = model(input_ids=probe).logits
    with pytest.raises(ValueError, match="add_lora"):
        train_tool_calls(model, tokenizer, TRACES, TOOLS, SYSTEM)
    torch.manual_seed(0)  # the adapters' A matrices
    add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=8, alpha=16)
    # teach only the name (the grammar writes the rest); before training it picks 1 of 4 right. One trace
    # a step at a moderate rate: with 4 a step at lr 3e-2 the loss of this large-weight model oscillated
    # (down to 0.13, back up to 1.7 at the end) and the last step's choices depended on the CPU's rounding.
    losses = train_tool_calls(model, tokenizer, TRACES, TOOLS, SYSTEM, epochs=40, batch_size=1, lr=1e-2,
                              name_only=True)
    assert len(losses) == 160 and max(losses[-4:]) < losses[0] / 100
    grammar = tool_call_grammar(tokenizer, TOOLS, "required")
    for t in TRACES:  # the random model now calls the tool each request was taught with
        ids = torch.tensor([full_prompt(tokenizer, t["request"])])
        tokens = [int(x[0]) for x in constrained_tokens(model, ids, 1500, 0.0, None, {tokenizer.eos_token_id},
                                                          None, grammar)]
        assert parse_tool_call(tokenizer.decode(tokens, skip_special_tokens=True))["name"] == t["tool"]
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=probe).logits, base_logits, atol=1e-3)
        for layer in [m for m in model.modules() if hasattr(m, "lora_B")]:
            layer.scaling = 0.0  # without the adapters' updates: the base model, untouched by training
        assert torch.allclose(model(input_ids=probe).logits, base_logits, atol=1e-5)


def test_rows_per_pass_gives_the_same_update_as_the_whole_batch(tiny):
    model, tokenizer = tiny
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    start = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    whole = train_tool_calls(model, tokenizer, TRACES, TOOLS, SYSTEM, epochs=2, batch_size=4, lr=1e-2)
    after_whole = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(start, strict=False)
    parts = train_tool_calls(model, tokenizer, TRACES, TOOLS, SYSTEM, epochs=2, batch_size=4, lr=1e-2,
                             rows_per_pass=1)
    assert parts == pytest.approx(whole, abs=1e-4)
    for k, v in model.state_dict().items():
        if "lora_" in k:
            assert torch.allclose(v, after_whole[k], atol=1e-5), k
