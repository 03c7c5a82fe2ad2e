"""From a next-token predictor to an assistant: SFT, reward models, PPO and DPO (lesson 12).

The losses are a few lines each; the lesson is in what they compare.

* **SFT** (supervised fine-tuning): ordinary next-token cross-entropy on instruction/response
  pairs, but only the *response* tokens count (labels are -100 on the prompt, as
  `utils.lora.sft_batch` builds them): the model learns to answer, not to write questions.
  `sft_loss` is that loss written out on full logits.
* **Reward model** (RLHF step 2): a scalar score r(prompt, response) trained on human preference
  pairs with the Bradley-Terry loss  -log sigmoid(r_chosen - r_rejected)  (`reward_model_loss`).
* **PPO** (RLHF step 3): sample responses, score them with the reward model, and move the policy
  towards higher reward with a clipped policy-gradient step (`ppo_clipped_objective`) while a KL
  penalty keeps it near the reference model (`kl_penalized_reward`).
* **DPO** (direct preference optimisation) skips the reward model and the sampling: with the
  log-probabilities of the chosen and rejected responses under the policy and under a frozen
  reference,  loss = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]).
  At the start (policy == reference) the margin is 0 and the loss is log 2 (`dpo_loss`).

`response_logprobs` computes the summed log-probability of the response tokens of a batch, the
one model-dependent piece DPO needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # label value that cross_entropy skips (PyTorch's default ignore_index)


# ----------------------------------------------------------------------------------------------
# Losses


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens.

    logits: (B, T, V); labels: (B, T) with -100 where the loss is skipped. Position t predicts t+1.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # predictions for tokens 1..T-1
    shifted_labels = labels[:, 1:].reshape(-1)
    if (shifted_labels != IGNORE).sum() == 0:
        raise ValueError("no labelled tokens: every label is -100")
    return F.cross_entropy(shifted_logits.float(), shifted_labels, ignore_index=IGNORE)


def response_logprobs(model, batch: dict, average: bool = False) -> torch.Tensor:
    """log pi(response | prompt) for each row of a batch: (B,) sums (or per-token means).

    batch: {"input_ids", "attention_mask", "labels"} as utils.lora.sft_batch builds it (labels
    -100 on prompt and padding). As lesson 08's answer_loss does, the big output layer runs only
    on the positions that predict a response token.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    hidden = model.get_decoder()(input_ids=input_ids,
                                 attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, d)
    targets = labels[:, 1:]                                                     # position t predicts t+1
    keep = targets != IGNORE                                                    # (B, T-1)
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])                # (N, vocab)
    token_logp = torch.log_softmax(logits.float(), dim=-1).gather(
        -1, targets[keep].unsqueeze(-1)).squeeze(-1)                            # (N,)
    rows = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(keep)[keep]  # (N,) row of each token
    total = torch.zeros(input_ids.shape[0], dtype=token_logp.dtype).index_add(0, rows, token_logp)
    return total / keep.sum(dim=1).clamp(min=1) if average else total


def reward_model_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a reward model on preference pairs: mean of -log sigmoid(r_c - r_r).

    P(chosen preferred) = sigmoid(r_c - r_r); the loss is its negative log-likelihood.
    """
    if reward_chosen.shape != reward_rejected.shape:
        raise ValueError(f"shapes differ: {tuple(reward_chosen.shape)} vs {tuple(reward_rejected.shape)}")
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1):
    """Direct Preference Optimisation (Rafailov et al., 2023), from the four log-probabilities.

    Each argument: (B,) summed log-probabilities of the chosen / rejected responses under the
    policy being trained and under the frozen reference model. Returns (loss, chosen_rewards,
    rejected_rewards), where reward = beta * (log pi - log ref) is DPO's implicit reward.
    """
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-probability tensors must have one shape, got {sorted(shapes)}")
    chosen_rewards = beta * (policy_chosen - reference_chosen)        # how much more likely than before
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()   # margin 0 -> log 2
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def kl_penalized_reward(reward: torch.Tensor, policy_logprob: torch.Tensor, reference_logprob: torch.Tensor,
                        kl_coef: float = 0.1) -> torch.Tensor:
    """The reward PPO maximises in RLHF: reward-model score minus kl_coef x (log pi - log ref)."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    return reward - kl_coef * (policy_logprob - reference_logprob)


def ppo_clipped_objective(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantage: torch.Tensor,
                          clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate (to maximise): mean of min(ratio * A, clip(ratio, 1-eps, 1+eps) * A),
    with ratio = pi_new / pi_old. Clipping stops one batch from moving the policy too far."""
    if not 0 < clip < 1:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    ratio = torch.exp(new_logprob - old_logprob)
    return torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage).mean()


# ----------------------------------------------------------------------------------------------
# Measuring preferences


def preference_margin(chosen_logprobs: torch.Tensor, rejected_logprobs: torch.Tensor) -> float:
    """Mean of log p(chosen) - log p(rejected): > 0 when the model prefers the chosen responses."""
    return float((chosen_logprobs - rejected_logprobs).float().mean())


def win_rate(chosen_scores, rejected_scores) -> tuple[float, int, int]:
    """(rate, wins, n): the fraction of pairs whose chosen score beats the rejected one (a tie counts
    half, so a model with no preference scores 0.5)."""
    chosen = torch.as_tensor(chosen_scores, dtype=torch.float64).reshape(-1)
    rejected = torch.as_tensor(rejected_scores, dtype=torch.float64).reshape(-1)
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"need two equally long, non-empty score lists, got {chosen.numel()} and {rejected.numel()}")
    wins = float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
    return wins / chosen.numel(), int((chosen > rejected).sum()), chosen.numel()
