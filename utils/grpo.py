"""GRPO with a verifiable reward: sample a group of answers per prompt, let a program score them, and
push the policy towards the answers that beat their own group (lesson 14).

RL with verifiable rewards (RLVR, as in DeepSeek-R1) needs no reward *model*: the reward is a program
(is the answer exactly the right integer?). GRPO (Shao et al., 2024) needs no *value* model either: the
baseline an answer is compared with is the mean reward of the other answers to the same prompt.

One step (`grpo_step`), for P prompts and a group of G answers each (N = P * G rows):

1. `sample_groups`: sample G completions per prompt with the current policy, batched and left-padded,
   keeping their token ids and their log-probabilities under the sampling policy ("old" log-probs).
2. A reward function scores each completion, e.g. `format_and_label_reward(reply, label)` -> 0, 0.5 or 1.5
   (0.5 for the format, 1 more for the right label) or `exact_integer_reward(reply, answer)` -> 0 or 1.
3. `utils.alignment.grpo_advantages`: each reward minus its group's mean, over the group's std.
4. `utils.alignment.grpo_loss`: PPO's clipped surrogate with those advantages on every completion token,
   plus beta * KL(policy || reference). The reference is the same model with its LoRA adapters switched
   off (`lora_disabled`): no second copy of the weights.

`train_grpo` repeats the step over a list of prompts with a progress bar; `evaluate` scores greedy replies.
The notebook's anchors: trl's GRPOTrainer (the loss, checked in tests/test_grpo.py), nanochat's
scripts/chat_rl.py and rasbt's reasoning-from-scratch (the sample -> score -> update loop).
"""

from __future__ import annotations

import random
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from utils.alignment import completion_logprobs, grpo_advantages, grpo_loss, kl_k3
from utils.checks import (
    check_choice,
    check_int,
    check_number,
    check_positive_int,
    check_text,
    check_text_list,
)
from utils.generation import encode_prompts, generate_batch, model_device, pad_token_id, render_prompts
from utils.lora import LoRALinear, check_lora_args, lora_layers
from utils.model_surgery import replace_linear
from utils.notebook_outputs import ProgressBar
from utils.sampling import check_sampling_args, sample_next_token

# ----------------------------------------------------------------------------------------------
# Verifiable rewards: a program, not a model, decides


def exact_integer_reward(reply: str, answer: int) -> float:
    """1.0 if the reply is the right integer and nothing else (spaces and one final '.' allowed), else 0.0.

    Shown in lesson 14. Example: ("15", 15) -> 1.0; ("15.", 15) -> 1.0; ("7 + 8 = 15", 15) -> 0.0.
    """
    check_text("reply", reply, allow_empty=True)
    check_int("answer", answer)
    match = re.fullmatch(r"\s*(-?\d+)\.?\s*", reply)
    return 1.0 if match is not None and int(match.group(1)) == answer else 0.0


def mentions_integer_reward(reply: str, answer: int) -> float:
    """FLAWED on purpose: 1.0 if the right integer appears anywhere in the reply, as any whole number.

    Shown in lesson 14, where a policy trained on it learns to write many numbers.
    Example: ("15", 15) -> 1.0; ("14 15 16 17", 15) -> 1.0 (!); ("150", 15) -> 0.0.
    """
    check_text("reply", reply, allow_empty=True)
    check_int("answer", answer)
    return 1.0 if any(int(n) == answer for n in re.findall(r"(?<![\d.])-?\d+(?!\.?\d)", reply)) else 0.0


SENTIMENT_LABELS = ("positive", "negative")


def reply_label(reply: str, labels=SENTIMENT_LABELS) -> str | None:
    """The label the reply *is* (any case; spaces and one final '.' allowed), or None if it is anything else.

    Example: ("Negative.", ...) -> "negative"; ("This review is negative.", ...) -> None.
    """
    check_text("reply", reply, allow_empty=True)
    labels = check_text_list("labels", labels)
    word = re.fullmatch(r"\s*(\w+)\.?\s*", reply)
    return word.group(1).lower() if word is not None and word.group(1).lower() in labels else None


def format_and_label_reward(reply: str, answer: str, labels=SENTIMENT_LABELS) -> float:
    """0.5 if the reply is exactly one label (the format), plus 1.0 if it is the right one: 0, 0.5 or 1.5.

    Shown in lesson 14. A two-part reward as in DeepSeek-R1 (a format reward and an accuracy reward): the
    format is easy to hit by chance, so groups differ early and GRPO gets a signal before accuracy moves.
    Example: ("negative", "negative") -> 1.5; ("Positive.", "negative") -> 0.5; ("It is negative.", "negative") -> 0.0.
    """
    labels = check_text_list("labels", labels)
    check_choice("answer", answer, labels)
    said = reply_label(reply, labels)
    return 0.0 if said is None else 0.5 + (1.0 if said == answer else 0.0)


def mentions_label_reward(reply: str, answer: str, labels=SENTIMENT_LABELS) -> float:
    """FLAWED on purpose: 1.0 if the right label appears anywhere in the reply, as a word (any case).

    Shown in lesson 14: a reply naming every label earns it on every prompt.
    Example: ("negative", "negative") -> 1.0; ("positive or negative", "negative") -> 1.0 (!).
    """
    check_text("reply", reply, allow_empty=True)
    check_choice("answer", answer, check_text_list("labels", labels))
    return 1.0 if answer in re.findall(r"\w+", reply.lower()) else 0.0


def score(replies: list[str], answers: list[int], reward_fn) -> torch.Tensor:
    """Rewards (N,) for N replies with their answers. Example: (["3", "4"], [3, 3], exact_integer_reward) -> [1, 0]."""
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be a function (reply, answer) -> float, got {reward_fn!r}")
    if len(replies) != len(answers):
        raise ValueError(f"one answer per reply: got {len(replies)} replies and {len(answers)} answers")
    rewards = torch.tensor([float(reward_fn(r, a)) for r, a in zip(replies, answers)])
    if not torch.isfinite(rewards).all():
        raise ValueError("reward_fn returned NaN or inf: rewards must be finite numbers")
    return rewards


# ----------------------------------------------------------------------------------------------
# Sampling a group of completions per prompt, keeping what the loss needs


@dataclass
class Rollout:
    """G sampled completions for each of P prompts; row i belongs to prompt i // G (N = P * G rows)."""

    prompt_ids: torch.Tensor       # (N, Tp) left-padded prompt tokens
    prompt_mask: torch.Tensor      # (N, Tp) 1 on real prompt tokens, 0 on padding
    completion_ids: torch.Tensor   # (N, Tc) sampled tokens, padded after each row's end
    completion_mask: torch.Tensor  # (N, Tc) 1 on sampled tokens up to and including the end token
    old_logprobs: torch.Tensor     # (N, Tc) log pi_old(token) under the sampling policy; 0 where masked
    texts: list[str]               # N decoded completions, special tokens dropped
    group_size: int                # G

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) completion lengths in tokens (the end token counted)."""
        return self.completion_mask.sum(dim=1)


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (N, max length), rows right-aligned. Example: [[5], [6, 7]] -> ids [[p, 5], [6, 7]]."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        ids[i, width - len(tokens):] = torch.tensor(tokens)
        mask[i, width - len(tokens):] = 1
    return ids, mask


@torch.no_grad()
def sample_groups(model, tokenizer, prompts, group_size: int, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> Rollout:
    """Sample `group_size` completions for each prompt in one batch, with a KV cache. Shown in lesson 14.

    prompts: rendered strings or chat-message lists (as utils.generation.generate_batch). A row ends at
    the end-of-sequence token (kept, as trl keeps it: the policy is also trained on when to stop) or
    after max_new_tokens. The old log-probs are those of the temperature-scaled distribution the tokens
    were drawn from (with top_p, of the distribution before the top-p cut, as trl computes them).
    """
    group_size = check_int("group_size", group_size, low=2, what=" (a group needs 2+ answers to compare)")
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    check_sampling_args(temperature, None, top_p)
    if temperature == 0:
        raise ValueError("temperature must be > 0: greedy decoding gives every answer of a group the same text")
    device, eos, pad = model_device(model), tokenizer.eos_token_id, pad_token_id(tokenizer)
    prompt_tokens = encode_prompts(tokenizer, render_prompts(tokenizer, prompts))
    prompt_ids, prompt_mask = left_pad([p for p in prompt_tokens for _ in range(group_size)], pad)  # (N, Tp)
    n = prompt_ids.shape[0]
    mask = prompt_mask.to(device)                                        # grows by one column per step
    positions = (mask.cumsum(-1) - 1).clamp(min=0)                       # (N, Tp) pads do not advance it
    out = model(input_ids=prompt_ids.to(device), attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    position = positions[:, -1:]                                         # (N, 1)
    tokens, logprobs = [], []                                            # per step: (N,) each
    done = torch.zeros(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float().cpu()                         # (N, V) next-token logits
        next_ids = sample_next_token(logits, temperature, top_p=top_p, generator=generator)   # (N,)
        next_ids[done] = pad                                             # finished rows only pad
        logp = torch.log_softmax(logits / temperature, dim=-1).gather(1, next_ids[:, None]).squeeze(1)
        tokens.append(next_ids)
        logprobs.append(torch.where(done, 0.0, logp))
        done = done | (next_ids == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        position = position + 1
        out = model(input_ids=next_ids[:, None].to(device), attention_mask=mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
    completion_ids = torch.stack(tokens, dim=1)                          # (N, Tc)
    # a token counts if no end token came *before* it: the end token itself counts
    ended_before = torch.cumsum((completion_ids == eos).int(), dim=1) - (completion_ids == eos).int()
    completion_mask = (ended_before == 0).long()                         # (N, Tc)
    old_logprobs = torch.stack(logprobs, dim=1) * completion_mask        # (N, Tc)
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
             for row, m in zip(completion_ids, completion_mask)]
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, old_logprobs, texts, group_size)


# ----------------------------------------------------------------------------------------------
# The update


def add_lora_top(model, n_layers: int, target_modules=("q_proj", "v_proj"), r: int = 8,
                 alpha: float = 16.0):
    """LoRA adapters (lesson 08) on the named linear layers of the top `n_layers` transformer blocks only;
    every other weight is frozen. Backpropagation then stops at the lowest adapted block: the blocks
    below keep no activations for the backward pass and cost nothing in it (time and memory).
    Example: add_lora_top(model, 6) adapts q_proj and v_proj of SmolLM2's blocks 24-29 of 30.
    """
    check_lora_args(r, alpha, 0.0)
    blocks = model.get_decoder().layers
    n_layers = check_int("n_layers", n_layers, low=1, high=len(blocks))
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    names = [name for name, module in model.named_modules()
             if ".layers." in name and name.rsplit(".", 1)[-1] in targets
             and int(name.split(".layers.")[1].split(".")[0]) >= len(blocks) - n_layers]
    if not names:
        raise ValueError(f"no layer named {list(targets)} in the top {n_layers} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    return replace_linear(model, names, lambda linear: LoRALinear(linear, r, alpha))


@contextmanager
def lora_disabled(model):
    """Inside the block the model computes as its frozen base (every adapter's scaling set to 0): GRPO's
    reference policy without a second copy of the weights (what trl does with a peft model)."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA adapters: add them (utils.lora.add_lora) so that the "
                         "reference is the model with its adapters switched off")
    scalings = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield model
    finally:
        for layer, scaling in zip(layers, scalings):
            layer.scaling = scaling


def select_groups(rollout: Rollout, keep: torch.Tensor) -> Rollout:
    """The rollout restricted to the groups where keep (P,) is True, columns trimmed to what is used."""
    rows = keep.repeat_interleave(rollout.group_size)                    # (N,)
    prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
    start = int((prompt_mask.sum(0) == 0).sum())                         # columns that are padding everywhere
    end = int(completion_mask.sum(1).max())
    return Rollout(rollout.prompt_ids[rows][:, start:], prompt_mask[:, start:],
                   rollout.completion_ids[rows][:, :end], completion_mask[:, :end],
                   rollout.old_logprobs[rows][:, :end], [t for t, k in zip(rollout.texts, rows) if k],
                   rollout.group_size)


def rollout_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """(N, Tc) log-probs of the rollout's completion tokens under `model` now (with gradient if enabled)."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1).to(model_device(model))
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1).to(input_ids.device)
    return completion_logprobs(model, input_ids, attention, rollout.completion_ids.shape[1], temperature)


def grpo_step(model, optimizer, rollout: Rollout, rewards: torch.Tensor, beta: float = 0.04,
              clip_eps: float = 0.2, temperature: float = 1.0, updates: int = 1,
              max_grad_norm: float = 1.0, skip_flat_groups: bool = False,
              groups_per_pass: int | None = None) -> dict:
    """One GRPO update from a scored rollout; returns the step's numbers (floats). Shown in lesson 14.

    rewards: (P, G) or (N,) one per completion. advantages (P, G) -> (N,) one per completion, the same on
    all its tokens. updates > 1 reuses the rollout for several gradient steps (the GRPO paper's mu):
    only then do the ratios leave 1 and the clipping act. beta = 0 drops the KL term (trl's default).
    skip_flat_groups=True leaves out the groups whose rewards are all equal (advantage 0: they would add
    only the KL term), as DAPO's dynamic sampling does: on a CPU that saves most of the early steps' cost.
    With it off, the loss is trl's GRPOTrainer loss on the same tensors (tests/test_grpo.py).
    groups_per_pass: run the forward and backward passes on that many groups at a time and add up their
    gradients (gradient accumulation, each part weighted by its share of the tokens): the same update,
    but the activations kept for the backward pass, which grow with rows x tokens, are those of one part.
    None: all groups in one pass.
    """
    beta = check_number("beta", beta, low=0)
    clip_eps = check_number("clip_eps", clip_eps, low=0, high=1, low_open=True, high_open=True)
    updates = check_positive_int("updates", updates)
    max_grad_norm = check_number("max_grad_norm", max_grad_norm, low=0, low_open=True)
    if groups_per_pass is not None:
        check_positive_int("groups_per_pass", groups_per_pass)
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    n, g = rollout.completion_ids.shape[0], rollout.group_size
    if rewards.numel() != n or rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[1] != g):
        raise ValueError(f"rewards must be (n_prompts, group_size) = ({n // g}, {g}) or ({n},): one per "
                         f"completion, got {tuple(rewards.shape)}")
    advantages = grpo_advantages(rewards.reshape(n // g, g)).reshape(n)   # (N,) NaN/inf refused there
    signal = (advantages.reshape(n // g, g) != 0).any(dim=1)             # (P,) groups that can teach
    stats = {"reward": rewards.float().mean().item(), "length": rollout.lengths.float().mean().item(),
             "groups_with_signal": signal.float().mean().item()}
    if skip_flat_groups:
        if not signal.any():
            return stats | {"loss": float("nan"), "kl": float("nan"), "clipped": float("nan")}
        rollout = select_groups(rollout, signal)
        advantages = advantages.reshape(n // g, g)[signal].reshape(-1)
    n_groups = rollout.completion_ids.shape[0] // g                     # groups left to train on
    per_pass = min(groups_per_pass or n_groups, n_groups)
    parts = []                                                           # (rollout part, advantages, ref)
    for first in range(0, n_groups, per_pass):
        keep = torch.zeros(n_groups, dtype=torch.bool)
        keep[first:first + per_pass] = True
        part = rollout if per_pass == n_groups else select_groups(rollout, keep)
        ref = None
        if beta > 0:
            with torch.no_grad(), lora_disabled(model):
                ref = rollout_logprobs(model, part, temperature)         # (n, Tc) log pi_ref
        parts.append((part, advantages[first * g:(first + per_pass) * g], ref))
    total_tokens = rollout.completion_mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(updates):
        optimizer.zero_grad(set_to_none=True)
        loss_value, ratios, kls = 0.0, [], []
        for part, part_advantages, ref in parts:
            mask = part.completion_mask
            new = rollout_logprobs(model, part, temperature)             # (n, Tc) with gradient
            loss = grpo_loss(new, part.old_logprobs, ref, part_advantages, mask, clip_eps=clip_eps, beta=beta)
            loss = loss * (mask.sum() / total_tokens)     # parts add up to the token mean of the batch
            loss.backward()                               # gradients accumulate; activations are freed
            loss_value += loss.item()
            counted = mask.bool()
            ratios.append(torch.exp(new.detach() - part.old_logprobs)[counted])
            if ref is not None:
                kls.append(kl_k3(new.detach(), ref)[counted])
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    ratio = torch.cat(ratios)
    kl = torch.cat(kls).mean().item() if kls else float("nan")
    return stats | {"loss": loss_value, "kl": kl,
                    "clipped": ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).float().mean().item()}


def train_grpo(model, tokenizer, optimizer, items: list[dict], reward_fn, steps: int, prompts_per_step: int = 4,
               group_size: int = 4, max_new_tokens: int = 24, temperature: float = 1.0, beta: float = 0.04,
               clip_eps: float = 0.2, updates: int = 1, skip_flat_groups: bool = True, seed: int = 0,
               progress: bool = True, groups_per_pass: int | None = None) -> list[dict]:
    """`steps` GRPO steps on items {"prompt": chat messages or text, "answer": int}; the history, one dict
    per step (grpo_step's numbers). Items are visited in a seeded shuffled order, P per step. groups_per_pass:
    see grpo_step (the same update with less memory). Shown in lesson 14.
    """
    steps = check_positive_int("steps", steps)
    prompts_per_step = check_int("prompts_per_step", prompts_per_step, low=1, high=max(1, len(items)))
    check_int("seed", seed, low=0)
    if not items or not all(isinstance(it, dict) and "prompt" in it and "answer" in it for it in items):
        raise ValueError("items must be a non-empty list of dicts with a 'prompt' and an 'answer'")
    order_rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    order = []
    history = []
    model.train()
    for _ in (bar := ProgressBar(range(steps), desc="GRPO", disable=not progress)):
        while len(order) < prompts_per_step:          # a fresh shuffled pass when the list runs out
            order += order_rng.sample(range(len(items)), len(items))
        batch = [items[i] for i in order[:prompts_per_step]]
        order = order[prompts_per_step:]
        rollout = sample_groups(model, tokenizer, [it["prompt"] for it in batch], group_size, max_new_tokens,
                                temperature, generator=generator)
        answers = [it["answer"] for it in batch for _ in range(group_size)]
        rewards = score(rollout.texts, answers, reward_fn).view(len(batch), group_size)  # (P, G)
        stats = grpo_step(model, optimizer, rollout, rewards, beta=beta, clip_eps=clip_eps,
                          temperature=temperature, updates=updates, skip_flat_groups=skip_flat_groups,
                          groups_per_pass=groups_per_pass)
        history.append(stats | {"example": rollout.texts[0]})   # one sampled reply, to read what is learnt
        bar.set_postfix(reward=f"{stats['reward']:.2f}", refresh=False)
    model.eval()
    return history


def evaluate(model, tokenizer, items: list[dict], reward_fn, max_new_tokens: int = 24,
             batch_size: int = 16) -> tuple[list[str], list[float]]:
    """Greedy replies to items' prompts and the reward each earns (floats). Shown in lesson 14."""
    replies = generate_batch(model, tokenizer, [it["prompt"] for it in items], max_new_tokens,
                             batch_size=batch_size)
    return replies, score(replies, [it["answer"] for it in items], reward_fn).tolist()
