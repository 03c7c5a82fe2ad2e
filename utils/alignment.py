"""From a next-token predictor to an assistant: SFT, a reward model, then PPO, DPO or GRPO (lesson 13).

The losses are a few lines each; the lesson is in what they compare.

1. **SFT** (supervised fine-tuning): next-token cross-entropy on instruction/response pairs, counted on
   the *response* tokens only (labels are -100 on the prompt): the model learns to answer (`sft_loss`).
2. **Reward model** (RLHF step 2): a scalar score r(prompt, response) trained on preference pairs with
   the Bradley-Terry loss  -log sigmoid(r_chosen - r_rejected)  (`reward_model_loss`).
3. Then one of three ways to move the policy towards preferred answers:
   * **PPO** (RLHF step 3): sample responses, score them with the reward model, subtract a KL penalty
     to the frozen reference at every token (`ppo_token_rewards`), turn rewards into per-token
     advantages with a value head (`gae_advantages`, `value_loss`), and take clipped policy-gradient
     steps (`ppo_loss`). Four models in memory: policy, reference, reward model, value model.
   * **DPO**: no reward model, no sampling. From the log-probabilities of the chosen and rejected
     responses under the policy and the reference,
     loss = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))])  (`dpo_loss`);
     `dpo_sft_loss` adds the SFT loss on the chosen replies (RPO), which keeps them likely.
   * **GRPO**: no value model. Sample a *group* of answers per prompt, score them (often with a program:
     a verifiable reward), and use each answer's reward relative to its group as the advantage
     (`grpo_advantages`); the loss is PPO's clipped objective plus a KL term to the reference (`grpo_loss`).

Conventions: log-probability tensors are per token, (B, T) = (responses, response tokens), with a 0/1
`mask` that is 1 on the tokens that count (response tokens, not padding). Masked positions may hold any
value, NaN included: they are replaced before any arithmetic, so neither the loss nor its gradient
depends on them. Checked against trl 1.16 in tests/test_alignment.py: dpo_loss and dpo_sft_loss against
DPOTrainer.compute_loss, grpo_advantages and grpo_loss against GRPOTrainer, reward_model_loss against
RewardTrainer.compute_loss.
The PPO loop around ppo_token_rewards / gae_advantages / ppo_loss / value_loss is utils.ppo; the reward
model is utils.reward_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.checks import check_choice, check_finite_tensor, check_int, check_number, check_same_shape

IGNORE = -100        # label value that cross_entropy skips (PyTorch's default ignore_index)
GRPO_STD_EPS = 1e-4  # trl's: advantages = (r - mean) / (std + 1e-4)
AGGREGATIONS = ("token", "sequence")


# ----------------------------------------------------------------------------------------------
# Input checks: wrong type -> TypeError, wrong value -> ValueError, saying what is allowed


def _check_mask(mask) -> torch.Tensor:
    """A (B, T) tensor of 0/1 (bool, int or float) with at least one 1 -> a bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of 0/1, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (B, T), got shape {tuple(mask.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (1 = the token counts)")
    if not mask.any():
        raise ValueError("mask has no 1s: there is no token to compute the loss on")
    return mask.bool()


def _check_tokens(name: str, x, mask: torch.Tensor) -> torch.Tensor:
    """A float (B, T) tensor, finite where mask is 1; masked values are replaced by 0 (value and gradient)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape != mask.shape:
        raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, got {tuple(x.shape)}")
    if not torch.isfinite(x[mask]).all():
        raise ValueError(f"{name} has NaN or inf values on unmasked tokens: those must be finite")
    return torch.where(mask, x, 0.0)  # torch.where sends zero gradient to the masked entries


def _check_advantages(advantages, mask: torch.Tensor) -> torch.Tensor:
    """Advantages: a scalar, (B,) one per response, (B, 1) or (B, T) -> (B, T), 0 where masked, detached."""
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.is_complex() or advantages.dtype == torch.bool:
        raise TypeError(f"advantages must be a real-valued tensor, got dtype {advantages.dtype}")
    B, T = mask.shape
    if advantages.dim() == 1:  # one per response; plain broadcasting would spread (B,) along T when B == T
        if advantages.shape[0] != B:
            raise ValueError(f"1-D advantages need one value per response (B={B}), got {advantages.shape[0]}")
        advantages = advantages.unsqueeze(1)
    try:
        advantages = advantages.expand(B, T) if advantages.dim() <= 2 else None
    except RuntimeError:
        advantages = None
    if advantages is None:
        raise ValueError(f"advantages must be a scalar, (B,), (B, 1) or (B, T) with (B, T) = {(B, T)}")
    if not advantages.is_floating_point():
        advantages = advantages.to(torch.get_default_dtype())
    if not torch.isfinite(advantages[mask]).all():
        raise ValueError("advantages has NaN or inf values on unmasked tokens: those must be finite")
    return torch.where(mask, advantages, 0.0).detach()  # constants: no gradient flows into them


def _clip_range(clip_eps, clip_eps_high) -> tuple[float, float]:
    low = check_number("clip_eps", clip_eps, low=0, high=1, low_open=True, high_open=True)
    if clip_eps_high is None:
        return 1 - low, 1 + low
    high = check_number("clip_eps_high", clip_eps_high, low=0, low_open=True)
    return 1 - low, 1 + high


# ----------------------------------------------------------------------------------------------
# SFT and the log-probabilities everything else needs


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


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-token log pi(token | everything before it) of the last n_completion tokens: (B, n_completion).

    input_ids, attention_mask: (B, T) = prompt then sampled completion (as PPO/GRPO rollouts are stored).
    Divide the logits by the sampling temperature, as trl does, so that the log-probs are those of the
    distribution the tokens were sampled from. Only the last n_completion + 1 logits are built.
    """
    n = check_int("n_completion", n_completion, low=1, high=input_ids.shape[1] - 1)
    temperature = check_number("temperature", temperature, low=0, low_open=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)               # (B, n, V): predicts t+1
    return logp.gather(-1, input_ids[:, -n:].unsqueeze(-1)).squeeze(-1)          # (B, n)


# ----------------------------------------------------------------------------------------------
# Reward model and DPO: losses on preference pairs


def reward_model_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a reward model on preference pairs: mean of -log sigmoid(r_c - r_r).

    P(chosen preferred) = sigmoid(r_c - r_r); the loss is its negative log-likelihood. Shown in lesson 13.
    Example: r_c = r_r -> log 2 = 0.693; r_c - r_r = 2 -> 0.127.
    """
    reward_chosen = check_finite_tensor("reward_chosen", reward_chosen)
    reward_rejected = check_finite_tensor("reward_rejected", reward_rejected)
    check_same_shape(reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1):
    """Direct Preference Optimisation (Rafailov et al., 2023), from the four log-probabilities.

    Each argument: (B,) summed log-probabilities of the chosen / rejected responses under the policy
    being trained and under the frozen reference. Returns (loss, chosen_rewards, rejected_rewards):
    loss is the mean over pairs of -log sigmoid(chosen_reward - rejected_reward) (trl's "sigmoid" loss),
    and reward = beta * (log pi - log ref) is DPO's implicit reward (detached, as trl logs it).
    Shown in lesson 13. Example: policy == reference -> loss = log 2, rewards 0.
    """
    beta = check_number("beta", beta, low=0, low_open=True)
    logps = {name: check_finite_tensor(name, t) for name, t in [("policy_chosen", policy_chosen),
             ("policy_rejected", policy_rejected), ("reference_chosen", reference_chosen),
             ("reference_rejected", reference_rejected)]}
    check_same_shape(**logps)
    chosen_rewards = beta * (logps["policy_chosen"] - logps["reference_chosen"])       # (B,) log-ratio to ref
    rejected_rewards = beta * (logps["policy_rejected"] - logps["reference_rejected"])
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()   # margin 0 -> log 2
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_sft_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                 reference_rejected: torch.Tensor, chosen_tokens: torch.Tensor, beta: float = 0.1,
                 sft_weight: float = 1.0):
    """DPO plus an SFT term on the chosen replies: dpo_loss + sft_weight * (their mean per-token NLL).

    A known variant: RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization"; trl's
    loss_type=["sigmoid", "sft"] with loss_weights=[1, sft_weight]). DPO alone only widens the gap between
    chosen and rejected and may lower both; the SFT term keeps the chosen replies likely in absolute terms.
    chosen_tokens: (B,) how many response tokens each chosen reply has (the sums above are over them).
    Returns (loss, chosen_rewards, rejected_rewards) as dpo_loss. Shown in lesson 13.
    Example: policy == reference, chosen log-prob -6 over 3 tokens, sft_weight 1 -> log 2 + 2 = 2.693.
    """
    sft_weight = check_number("sft_weight", sft_weight, low=0)
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                      reference_rejected, beta)
    if not isinstance(chosen_tokens, torch.Tensor):
        raise TypeError(f"chosen_tokens must be a torch.Tensor of counts, got {type(chosen_tokens).__name__}")
    if chosen_tokens.shape != policy_chosen.shape:
        raise ValueError(f"chosen_tokens must be a tensor of shape {tuple(policy_chosen.shape)}: one count per "
                         f"chosen reply, got shape {tuple(chosen_tokens.shape)}")
    if (chosen_tokens < 1).any():
        raise ValueError("chosen_tokens must be >= 1: every chosen reply has at least one token")
    nll = -policy_chosen.sum() / chosen_tokens.sum()    # mean over all chosen tokens of the batch (trl's)
    return loss + sft_weight * nll, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------
# PPO and GRPO: advantages, then a clipped policy-gradient loss


def kl_k3(new_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate, Schulman's k3: exp(ref - new) - (ref - new) - 1, elementwise.

    On tokens sampled from pi its mean is the KL divergence; unlike log pi - log ref (k1) it is never
    negative. GRPO and trl use it. Example: new = ref -> 0; new - ref = log 2 -> 0.5 - log 0.5 - 1 = 0.193.
    """
    new_logprobs = check_finite_tensor("new_logprobs", new_logprobs)
    ref_logprobs = check_finite_tensor("ref_logprobs", ref_logprobs)
    check_same_shape(new_logprobs=new_logprobs, ref_logprobs=ref_logprobs)
    log_ratio = ref_logprobs - new_logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages: rewards (n_prompts, group_size) -> (n_prompts, group_size).

    Each reward minus its group's mean, divided by the group's standard deviation + 1e-4 (trl's
    GRPOTrainer: the *unbiased* std, Bessel's n-1, as torch.std and trl's nanstd compute it). A group whose
    rewards are all equal carries no signal and gets exactly 0 (never NaN). scale="batch" divides by the
    std of the whole batch instead, scale="none" does not divide (Dr. GRPO), as trl's scale_rewards.
    Shown in lesson 13. Example: [[1, 0, 0], [2, 2, 2]] -> [[1.1545, -0.5773, -0.5773], [0, 0, 0]].
    """
    rewards = check_finite_tensor("rewards", rewards, floating=False)  # a verifier's 0/1 ints are fine
    check_choice("scale", scale, ("group", "batch", "none"))
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (n_prompts, group_size >= 2), got {tuple(rewards.shape)}")
    advantages = rewards - rewards.mean(dim=1, keepdim=True)            # (P, G) centred on the group mean
    if scale == "group":
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + GRPO_STD_EPS)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + GRPO_STD_EPS)
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)   # (P, 1); rounding in the mean
    return advantages.masked_fill(all_equal, 0.0)                       # must not leave 1e-8 / 1e-4 there


def ppo_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float = 0.05) -> torch.Tensor:
    """RLHF's per-token reward (B, T): -kl_coef * (log pi - log ref) at every response token, plus the
    reward model's score (B,) on each response's last token. 0 where mask is 0. (trl's PPO, k1 KL.)

    Example: scores [1.0], log pi - log ref = [0.5, 0.5], kl_coef 0.1 -> [[-0.05, 0.95]].
    """
    mask = _check_mask(mask)
    scores = check_finite_tensor("scores", scores, floating=False)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be (B,) = {tuple(mask.shape[:1])}: one per response, "
                         f"got {tuple(scores.shape)}")
    kl_coef = check_number("kl_coef", kl_coef, low=0)
    if not mask.any(dim=1).all():
        raise ValueError("every row of mask needs at least one 1: the score goes on the last response token")
    kl = _check_tokens("logprobs", logprobs, mask) - _check_tokens("ref_logprobs", ref_logprobs, mask)
    rewards = -kl_coef * kl.detach()                                            # (B, T), 0 where masked
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)                 # (B,) last counted token
    rewards[torch.arange(len(last)), last] += scores.detach()
    return rewards


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al., 2016) for PPO with a value head.

    rewards, values, mask: (B, T), one row per response, its counted tokens one contiguous run (padding on
    either side). delta_t = r_t + gamma * V_{t+1} - V_t (V = 0 after the last token: the episode ends);
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = advantages + values), both (B, T),
    0 where masked, detached (targets, not paths for gradient). gamma = 1, lam = 0.95 are trl's PPO defaults.
    Example: rewards [[0, 1]], values [[0.5, 0.5]], gamma = lam = 1 -> advantages [[0.5, 0.5]].
    """
    mask = _check_mask(mask)
    gamma = check_number("gamma", gamma, low=0, high=1)
    lam = check_number("lam", lam, low=0, high=1)
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(dim=1) + mask[:, 0]       # (B,) starts of runs of 1s
    if (runs > 1).any():
        raise ValueError("each row of mask must be one contiguous run of 1s (padding before or after it)")
    rewards = _check_tokens("rewards", rewards, mask).detach()
    values = _check_tokens("values", values, mask).detach()            # 0 where masked, so V = 0 past the end
    next_values = F.pad(values[:, 1:], (0, 1))                          # (B, T) V_{t+1}; 0 after the end
    deltas = rewards + gamma * next_values - values                    # (B, T) one-step TD errors
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])                            # (B,) A_{t+1}; 0 after a row's end,
    for t in reversed(range(deltas.shape[1])):                          # where r = V = 0 make delta 0
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, advantages + values


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The value head's loss: 0.5 * mean over counted tokens of (V - return)^2 (returns are targets).

    Example: values [[1, 2]], returns [[0, 2]], mask [[1, 1]] -> 0.25.
    """
    mask = _check_mask(mask)
    error = _check_tokens("values", values, mask) - _check_tokens("returns", returns, mask).detach()
    return 0.5 * (error ** 2).sum() / mask.sum()


def _ratio(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """pi_new / pi_old per token; old is a constant of the rollout, even if the caller passed new itself."""
    return torch.exp(new - old.detach())


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, low: float,
                       high: float) -> torch.Tensor:
    """Per-token -min(ratio * A, clip(ratio, low, high) * A): PPO's surrogate, to minimise."""
    return -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """(B, T) per-token losses, 0 where masked -> scalar."""
    if check_choice("aggregation", aggregation, AGGREGATIONS) == "token":
        return per_token.sum() / mask.sum()  # every counted token weighs the same: trl "bnpo"/"dapo"
    # each response weighs the same, whatever its length (trl "grpo"; an empty row counts 0, as trl's clamp)
    return (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def ppo_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
             aggregation: str = "token") -> torch.Tensor:
    """PPO's token-level clipped surrogate loss (Schulman et al., 2017), a scalar to MINIMISE.

    new_logprobs (B, T): log pi of the sampled tokens under the policy being trained (with gradient);
    old_logprobs (B, T): the same under the policy that sampled them (a constant); advantages: (B, T),
    (B,)/(B, 1) one per response, or a scalar; mask (B, T) 0/1. Per token, with ratio = pi_new / pi_old:
        loss_t = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A)
    so a token gains nothing by moving its ratio beyond the clip range in the direction A favours.
    clip_eps_high defaults to clip_eps (DAPO's "clip higher" sets it larger, e.g. 0.28).
    aggregation="token" (default): the mean over all unmasked tokens in the batch (trl's GRPO "bnpo",
    and "dapo" when the batch is the whole generation batch); "sequence": the mean over each response's
    tokens, then over responses (trl's "grpo", the GRPO paper). Masked tokens change neither the value
    nor the gradient. Shown in lesson 13. Example: ratio 2, A = 1, clip_eps 0.2 -> loss -1.2.
    """
    mask = _check_mask(mask)
    low, high = _clip_range(clip_eps, clip_eps_high)
    new = _check_tokens("new_logprobs", new_logprobs, mask)
    ratio = _ratio(new, _check_tokens("old_logprobs", old_logprobs, mask))                 # (B, T)
    per_token = _clipped_surrogate(ratio, _check_advantages(advantages, mask), low, high)  # (B, T)
    return _aggregate(torch.where(mask, per_token, 0.0), mask, aggregation)


def grpo_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04,
              clip_eps_high: float | None = None, aggregation: str = "token",
              kl_importance_weight: bool = False) -> torch.Tensor:
    """GRPO's loss (Shao et al., 2024), a scalar to MINIMISE: PPO's clipped surrogate plus beta times the
    k3 KL estimate to the frozen reference, per token, then averaged as in ppo_loss:
        loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * kl_k3(new, ref)_t
    This is trl's GRPOTrainer loss (importance_sampling_level="token"; aggregation "token" = loss_type
    "bnpo"/"dapo", "sequence" = "grpo"). advantages: usually grpo_advantages(rewards).reshape(-1), one per
    response. beta = 0.04 is the GRPO paper's (trl's default is 0: no reference model; then pass
    ref_logprobs=None). kl_importance_weight=True multiplies the KL term by the ratio (with its gradient), so
    that it is the reverse-KL gradient also off-policy (DeepSeek-V3.2; trl 1.16's use_bias_correction_kl,
    on by default there). Shown in lesson 13. Example: ratio 1, A = 0, new = ref -> loss 0.
    """
    beta = check_number("beta", beta, low=0)
    mask = _check_mask(mask)
    low, high = _clip_range(clip_eps, clip_eps_high)
    new = _check_tokens("new_logprobs", new_logprobs, mask)
    ratio = _ratio(new, _check_tokens("old_logprobs", old_logprobs, mask))                 # (B, T)
    per_token = _clipped_surrogate(ratio, _check_advantages(advantages, mask), low, high)   # (B, T)
    if ref_logprobs is None and beta > 0:
        raise ValueError("ref_logprobs is None: pass the reference's log-probs, or beta=0 (no KL term)")
    if ref_logprobs is not None:
        log_ratio = _check_tokens("ref_logprobs", ref_logprobs, mask).detach() - new       # (B, T) log ref/pi
        kl = torch.exp(log_ratio) - log_ratio - 1                                       # (B, T) k3
        per_token = per_token + beta * (kl * ratio if kl_importance_weight else kl)
    return _aggregate(torch.where(mask, per_token, 0.0), mask, aggregation)
