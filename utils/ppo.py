"""PPO for a language model, run for real: rollouts, a KL penalty, GAE and the clipped update (lesson 13).

RLHF's step 3 (Ouyang et al., 2022; trl's PPOTrainer). One iteration:

    prompts --policy samples--> completions (token ids, their log-probs pi_old, the value head's V)
            --reward model----> one score per completion
            --reference-------> log-probs under the frozen model (the policy with its LoRA disabled)
    per-token reward  r_t = -kl_coef * (log pi_old - log ref)_t  (+ the score on the last token)
    GAE (gamma, lam) with V  ->  advantages A_t and returns
    update: minimise  ppo_loss(log pi_new, log pi_old, A) + vf_coef * value_loss(V_new, returns)

The losses live in utils.alignment (ppo_token_rewards, gae_advantages, ppo_loss, value_loss); this module
is the loop around them. Memory: one copy of the LLM. The policy is the LLM with a LoRA adapter, the
reference is the same LLM with the adapter disabled (utils.reward_model.lora_disabled), and the value
model is a linear head on the policy's last hidden state (a shared trunk, as trl's
AutoModelForCausalLMWithValueHead; here the head reads the hidden state detached, so it learns alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.alignment import gae_advantages, ppo_loss, ppo_token_rewards, value_loss
from utils.checks import check_number, check_positive_int, check_text_list
from utils.generation import pad_token_id
from utils.notebook_outputs import ProgressBar
from utils.reward_model import lora_disabled
from utils.sampling import sample_next_token


class ValueHead(nn.Module):
    """V(state): hidden state (..., d) -> (...), the return expected from this token on. Starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.detach().float()).squeeze(-1)  # detached: the trunk is the policy's


@dataclass
class PPOConfig:
    """trl's PPO defaults where they fit a CPU: gamma 1, lam 0.95, clip 0.2, vf_coef 0.1 (trl's), whitened A.

    normalize_scores: the reward model's raw scores are shifted and scaled per batch (like trl's
    whiten_rewards, on the scores only), so that the value head, which starts at 0, and kl_coef see
    rewards of size ~1 whatever the reward model's scale. missing_eos_penalty: trl's option of the same name.
    """
    batch_size: int = 8          # completions per iteration (one per prompt)
    minibatches: int = 2         # updates per iteration; the 2nd sees a moved policy, so the clip can bite
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 1e-3
    kl_coef: float = 0.05        # the penalty on log pi - log ref, per token
    normalize_scores: bool = True   # each batch's scores -> mean 0, std 1 (a reward model's scale is arbitrary)
    missing_eos_penalty: float = 0.0  # subtracted from (normalised) scores of replies cut off before eos (trl's)
    clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self):
        for name in ("batch_size", "minibatches", "max_new_tokens"):
            check_positive_int(name, getattr(self, name))
        if self.minibatches > self.batch_size:
            raise ValueError(f"minibatches ({self.minibatches}) cannot exceed batch_size ({self.batch_size})")
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("kl_coef", self.kl_coef, low=0)
        check_number("missing_eos_penalty", self.missing_eos_penalty, low=0)
        check_number("clip_eps", self.clip_eps, low=0, high=1, low_open=True, high_open=True)
        check_number("vf_coef", self.vf_coef, low=0)
        check_number("gamma", self.gamma, low=0, high=1)
        check_number("lam", self.lam, low=0, high=1)


# ----------------------------------------------------------------------------------------------
# Rollouts: sampling with the token ids, log-probs and values PPO needs


@torch.no_grad()
def sample_completions(model, value_head: ValueHead, tokenizer, prompts, max_new_tokens: int = 16,
                       temperature: float = 1.0, generator: torch.Generator | None = None) -> dict:
    """Sample one completion per rendered prompt, keeping what PPO needs. Shown in lesson 13.

    Returns a dict of tensors, P = longest prompt, T = the longest completion (<= max_new_tokens):
      input_ids (B, P+T): left-padded prompt, then the completion, then padding after its eos;
      attention_mask (B, P+T); completion_mask (B, T): 1 on the completion's tokens, its eos included
      (stopping is an action the policy is rewarded for); logprobs (B, T): log pi(token) of the sampling
      distribution (logits / temperature, as trl); values (B, T): V of the state each token was chosen in.
    The prompt runs once, then one token per step with the KV cache, as utils.generation.generate_batch.
    """
    check_text_list("prompts", prompts)
    T = check_positive_int("max_new_tokens", max_new_tokens)
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    rows = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    B, P = len(rows), max(len(r) for r in rows)
    prompt_ids = torch.full((B, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    for i, r in enumerate(rows):                       # left padding: every prompt ends in column P-1
        prompt_ids[i, P - len(r):] = torch.tensor(r)
        prompt_mask[i, P - len(r):] = 1
    completion = torch.full((B, T), pad, dtype=torch.long)
    completion_mask = torch.zeros((B, T), dtype=torch.long)
    logprobs, values = torch.zeros(B, T), torch.zeros(B, T)
    done = torch.zeros(B, dtype=torch.bool)
    step_ids, attention, cache = prompt_ids, prompt_mask, None
    for t in range(T):
        out = model.get_decoder()(input_ids=step_ids, attention_mask=attention, past_key_values=cache,
                                  use_cache=True)
        cache = out.past_key_values
        hidden = out.last_hidden_state[:, -1]                                    # (B, d) state before token t
        logp = torch.log_softmax(model.get_output_embeddings()(hidden).float() / temperature, dim=-1)
        token = sample_next_token(logp, temperature=1.0, generator=generator)   # (B,) from softmax(logp)
        token = torch.where(done, torch.full_like(token, pad), token)
        completion[:, t], completion_mask[:, t] = token, (~done).long()
        logprobs[:, t] = logp.gather(1, token[:, None]).squeeze(1)
        values[:, t] = value_head(hidden)
        done = done | (token == eos)
        if done.all():
            break
        step_ids = token[:, None]
        attention = torch.cat([attention, completion_mask[:, t:t + 1]], dim=1)  # a finished row's pads: 0
    width = int(completion_mask.any(dim=0).sum())                              # columns used (<= T)
    completion, completion_mask = completion[:, :width], completion_mask[:, :width]
    logprobs, values = logprobs[:, :width] * completion_mask, values[:, :width] * completion_mask
    return {"input_ids": torch.cat([prompt_ids, completion], dim=1),
            "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
            "completion_mask": completion_mask, "logprobs": logprobs, "values": values}


def policy_forward(model, value_head: ValueHead, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   n_completion: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi, V) of the last n_completion tokens, both (B, n), from one forward pass (with gradient).

    The output layer runs only on the n positions that predict a completion token (lesson 08's trick).
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    states = hidden[:, -n_completion - 1:-1]                                    # (B, n, d) state before each
    logits = model.get_output_embeddings()(states).float() / temperature       # (B, n, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, -n_completion:, None]).squeeze(-1)
    return logp, value_head(states)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries (trl whitens PPO's advantages); 0 where mask is 0.

    Example: x [[1, 3, 99]], mask [[1, 1, 0]] -> [[-0.7071, 0.7071, 0]] (unbiased std).
    """
    m = mask.bool()
    mean, std = x[m].mean(), x[m].std() if m.sum() > 1 else torch.tensor(1.0)
    return torch.where(m, (x - mean) / (std + 1e-8), 0.0)


# ----------------------------------------------------------------------------------------------
# The loop


def ppo_iteration(model, value_head: ValueHead, tokenizer, prompts: list[str], questions: list[str],
                  reward_fn, optimizer, config: PPOConfig, generator: torch.Generator | None = None) -> dict:
    """One rollout -> update round on len(prompts) prompts. Returns what a person wants to watch.

    prompts: rendered chat prompts the policy continues; questions: the same in plain text, for
    reward_fn(questions, replies) -> (B,) scores (e.g. RewardModel.score).
    """
    model.eval()
    rollout = sample_completions(model, value_head, tokenizer, prompts, config.max_new_tokens,
                                 config.temperature, generator)
    ids, attention, mask = rollout["input_ids"], rollout["attention_mask"], rollout["completion_mask"]
    n = mask.shape[1]                                                          # completion columns
    replies = [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
               for row, m in zip(ids[:, -n:], mask)]
    raw_scores = reward_fn(questions, replies)                                 # (B,)
    if raw_scores.shape != (len(prompts),) or not torch.isfinite(raw_scores).all():
        raise ValueError(f"reward_fn must return {len(prompts)} finite scores, got {raw_scores}")
    scores = raw_scores.float()
    if config.normalize_scores and len(scores) > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    finished = (ids[:, -n:] == tokenizer.eos_token_id).any(dim=1)              # (B,) stopped by itself
    scores = scores - config.missing_eos_penalty * (~finished).float()
    with torch.no_grad(), lora_disabled(model):                                # the frozen reference
        ref_logprobs, _ = policy_forward(model, value_head, ids, attention, n, config.temperature)
    old_logprobs = rollout["logprobs"]
    rewards = ppo_token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef=config.kl_coef)  # (B, n)
    advantages, returns = gae_advantages(rewards, rollout["values"], mask, config.gamma, config.lam)
    advantages = whiten(advantages, mask)
    model.train()
    losses = []
    for rows in torch.arange(len(prompts)).chunk(config.minibatches):
        new_logprobs, new_values = policy_forward(model, value_head, ids[rows], attention[rows], n,
                                                  config.temperature)
        policy = ppo_loss(new_logprobs, old_logprobs[rows], advantages[rows], mask[rows], config.clip_eps)
        loss = policy + config.vf_coef * value_loss(new_values, returns[rows], mask[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(policy.item())
    model.eval()
    kl = ((old_logprobs - ref_logprobs) * mask).sum(dim=1)                     # (B,) log pi/ref per reply
    return {"score": raw_scores.float().mean().item(), "kl": kl.mean().item(), "policy_loss": sum(losses) / len(losses),
            "length": mask.sum(dim=1).float().mean().item(), "replies": replies, "questions": list(questions)}


def train_ppo(model, value_head: ValueHead, tokenizer, prompts: list[str], questions: list[str], reward_fn,
              iterations: int, config: PPOConfig | None = None, seed: int = 0) -> list[dict]:
    """Run `iterations` PPO iterations; each takes the next config.batch_size prompts (cycling, shuffled
    with `seed`). Trains the model's trainable parameters (its LoRA) and the value head. Returns one record
    per iteration (mean reward-model score, KL to the reference, policy loss, mean length, the replies).
    Shown in lesson 13.
    """
    config = config or PPOConfig()
    check_text_list("prompts", prompts)
    check_text_list("questions", questions)
    if len(prompts) != len(questions):
        raise ValueError(f"need one question per prompt, got {len(prompts)} and {len(questions)}")
    iterations = check_positive_int("iterations", iterations)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    if len(params) == len(list(value_head.parameters())):
        raise ValueError("the model has no trainable parameters: add a LoRA adapter first")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    history = []
    for it in (bar := ProgressBar(range(iterations), desc=f"PPO (kl_coef {config.kl_coef:g})")):
        take = [order[(it * config.batch_size + k) % len(order)] for k in range(config.batch_size)]
        record = ppo_iteration(model, value_head, tokenizer, [prompts[i] for i in take],
                               [questions[i] for i in take], reward_fn, optimizer, config, generator)
        history.append(record)
        bar.set_postfix(score=f"{record['score']:.2f}", kl=f"{record['kl']:.2f}")
    return history
