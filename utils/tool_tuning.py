"""Teaching a small model which tool to call: LoRA (lesson 08) on course-written tool-use traces.

Every training example has the same long start: the system prompt that describes the tools (~300
tokens of SmolLM2's 330). Only the end differs: the request and the call. So the shared start is run
once per step, without a gradient, and every example's own tokens are run on top of its keys and
values. The loss is exactly the loss of the full examples (same forward pass); the gradient leaves
out how the adapters change the shared start, as Transformer-XL treats its cached memory (a
stop-gradient). On SmolLM2 a batch of 8 costs ~3 s instead of ~12 s.

* `trace_examples(tokenizer, traces, tools, system)` -> (shared start ids, [example ids], [call ids]).
* `prefix_keys_values(model, prefix)`: the shared start's keys and values, without a gradient.
* `shared_prefix_loss(model, prefix, rows, calls)`: mean cross-entropy of the call tokens.
* `train_tool_calls(model, tokenizer, traces, tools, system, ...)`: the loop; returns the losses.

Shown in lesson 16.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from utils.checks import check_positive_int
from utils.generation import pad_token_id, shared_prefix_length
from utils.lora import lora_layers
from utils.tool_calls import CALL_OPEN, format_tool_call, render_messages


def trace_examples(tokenizer, traces: list[dict], tools: list[dict], system: str, name_only: bool = False):
    """traces: [{"request": ..., "tool": ..., "arguments": {...}}] -> (prefix (1, P) ids, [rows], [calls]).

    A row is the rest of the prompt (what the course server renders for the request) plus the call's
    opening `<tool_call>{"name": "`, which the grammar writes anyway; a call is what is taught: the tool's
    name, its arguments and the end of the turn (name_only: the name alone).
    """
    if not traces:
        raise ValueError("traces is empty: give at least one {'request', 'tool', 'arguments'} example")
    opening = tokenizer.encode(CALL_OPEN + '{"name": "', add_special_tokens=False)
    prompts, calls = [], []
    for t in traces:
        missing = {"request", "tool", "arguments"} - set(t)
        if missing:
            raise ValueError(f"a trace lacks {sorted(missing)}: {str(t)[:120]}")
        messages = render_messages([{"role": "system", "content": system}, {"role": "user", "content": t["request"]}],
                                   tools)
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"] + opening)
        call = format_tool_call(t["tool"], t["arguments"])
        rest = t["tool"] if name_only else call[len(CALL_OPEN + '{"name": "'):]
        calls.append(tokenizer.encode(rest, add_special_tokens=False) + ([] if name_only else [tokenizer.eos_token_id]))
    n = shared_prefix_length(prompts) if len(prompts) > 1 else len(prompts[0]) - 1
    return torch.tensor([prompts[0][:n]]), [p[n:] for p in prompts], calls


def prefix_keys_values(model, prefix: torch.Tensor):
    """The keys and values of prefix (1, P) under the model's current weights, computed without a gradient
    (and without the output layer: nothing is predicted inside the shared start)."""
    with torch.no_grad():
        return model.get_decoder()(input_ids=prefix, use_cache=True).past_key_values


def shared_prefix_loss(model, prefix: torch.Tensor, rows: list[list[int]], calls: list[list[int]], pad: int = 0,
                       past=None):
    """Mean cross-entropy of the call tokens of prefix + row + call, for each row (a transformers model).

    The prefix (1, P) runs once without a gradient (or pass its `prefix_keys_values` as past, to share
    them between calls); the rows (right-padded) run on a copy of its keys and values.
    """
    past = copy.deepcopy(past) if past is not None else prefix_keys_values(model, prefix)
    past.batch_repeat_interleave(len(rows))  # (1, ...) -> (B, ...): every row continues the same start
    seqs = [r + c for r, c in zip(rows, calls)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)  # what position t should predict
    mask = torch.zeros((len(seqs), prefix.shape[1] + width), dtype=torch.long)
    mask[:, : prefix.shape[1]] = 1
    for i, (r, c) in enumerate(zip(rows, calls)):
        ids[i, : len(r) + len(c)] = torch.tensor(r + c)
        targets[i, len(r) - 1: len(r) + len(c) - 1] = torch.tensor(c)  # the call only, not the request
        mask[i, prefix.shape[1]: prefix.shape[1] + len(r) + len(c)] = 1
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, past_key_values=past,
                                 use_cache=True).last_hidden_state  # (B, T, d)
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[keep])  # (N call tokens, vocab): only where a label is
    return F.cross_entropy(logits.float(), targets[keep])


def train_tool_calls(model, tokenizer, traces: list[dict], tools: list[dict], system: str, *, epochs: int = 3,
                     batch_size: int = 8, lr: float = 1e-3, seed: int = 0, name_only: bool = False,
                     rows_per_pass: int | None = None) -> list[float]:
    """Train the model's LoRA adapters (utils.lora.add_lora first) to answer each trace's request with its
    call. Shuffled batches, AdamW; returns the loss of every step. rows_per_pass: run a batch in parts of
    this many examples (gradient accumulation, each part weighted by its share of the call tokens: the same
    update as the whole batch, with a fraction of the activation memory). Example:
    losses = train_tool_calls(model, tokenizer, traces, tool_specs, AGENT_SYSTEM)"""
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    rows_per_pass = batch_size if rows_per_pass is None else rows_per_pass
    check_positive_int("rows_per_pass", rows_per_pass)
    params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    if not params:
        raise ValueError("the model has no LoRA adapters: call utils.lora.add_lora(model, ...) first")
    prefix, rows, calls = trace_examples(tokenizer, traces, tools, system, name_only)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses, was_training = [], model.training
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                pick = order[start: start + batch_size]
                tokens = sum(len(calls[i]) for i in pick)
                optimizer.zero_grad()
                step_loss = 0.0
                past = prefix_keys_values(model, prefix)  # once per step: the weights change only at its end
                for part in range(0, len(pick), rows_per_pass):
                    some = pick[part: part + rows_per_pass]
                    share = sum(len(calls[i]) for i in some) / tokens  # mean over the batch's call tokens
                    loss = shared_prefix_loss(model, prefix, [rows[i] for i in some], [calls[i] for i in some],
                                              pad_token_id(tokenizer), past) * share
                    loss.backward()
                    step_loss += float(loss.detach())
                optimizer.step()
                losses.append(round(step_loss, 4))
    finally:
        model.train(was_training)
    return losses
