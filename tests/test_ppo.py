"""utils.ppo: rollouts keep the right token ids, log-probs and values; one PPO iteration runs and moves the
policy towards what the reward function pays for; bad input. On the tiny stand-in model (tests/standin.py)."""

from __future__ import annotations

import pytest
import torch

from tests.standin import tiny_chat_model
from utils.lora import add_lora
from utils.ppo import (
    PPOConfig,
    ValueHead,
    policy_forward,
    ppo_iteration,
    sample_completions,
    train_ppo,
    whiten,
)
from utils.reward_model import lora_disabled

PROMPTS = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"]


def policy(seed=0):
    model, tokenizer = tiny_chat_model(seed=seed)
    add_lora(model, ["q_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=8)
    return model, tokenizer, ValueHead(model.config.hidden_size)


def test_rollout_logprobs_are_those_of_a_full_forward_pass():
    model, tok, head = policy()
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    out = sample_completions(model, head, tok, PROMPTS, max_new_tokens=6, temperature=0.8,
                             generator=torch.Generator().manual_seed(0))
    B, n = out["completion_mask"].shape
    assert B == 3 and 1 <= n <= 6 and out["input_ids"].shape[1] == out["attention_mask"].shape[1]
    with torch.no_grad():
        logp, values = policy_forward(model, head, out["input_ids"], out["attention_mask"], n, temperature=0.8)
    mask = out["completion_mask"].bool()
    # the KV-cached step-by-step sampler and one padded forward pass agree on every sampled token
    assert torch.allclose(logp[mask], out["logprobs"][mask], atol=1e-4)
    assert torch.allclose(values[mask], out["values"][mask], atol=1e-4)
    assert (out["logprobs"][mask] < 0).all() and (out["logprobs"][~mask] == 0).all()


def test_a_row_stops_after_its_eos_and_the_eos_counts():
    model, tok, head = policy()
    with torch.no_grad():   # make eos overwhelmingly likely: every completion is exactly [eos]
        model.lm_head.weight[tok.eos_token_id] *= 0
        model.lm_head.bias = None
    eos_bias = torch.zeros(len(tok))
    eos_bias[tok.eos_token_id] = 100.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + eos_bias)
    out = sample_completions(model, head, tok, PROMPTS, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out["completion_mask"].tolist() == [[1], [1], [1]]
    assert (out["input_ids"][:, -1] == tok.eos_token_id).all()


def test_sampling_is_reproducible_with_a_seed():
    model, tok, head = policy()
    a = sample_completions(model, head, tok, PROMPTS, 5, generator=torch.Generator().manual_seed(3))
    b = sample_completions(model, head, tok, PROMPTS, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_whiten():
    out = whiten(torch.tensor([[1.0, 3.0, 99.0]]), torch.tensor([[1, 1, 0]]))
    assert torch.allclose(out, torch.tensor([[-0.7071, 0.7071, 0.0]]), atol=1e-4)


def test_one_iteration_raises_the_rewarded_reply_and_lowers_the_punished_one(monkeypatch):
    """Six sampled replies, scored +3, -3 and 0 (x4): after one PPO iteration (no KL penalty) the policy
    gives the +3 reply a higher log-probability than when it was sampled, and the -3 reply a lower one."""
    import utils.ppo as ppo

    torch.manual_seed(0)
    model, tok, head = policy()
    config = PPOConfig(batch_size=6, minibatches=1, max_new_tokens=8, lr=3e-2, kl_coef=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    captured = {}

    def keep(*args, **kwargs):
        captured.update(sample_completions(*args, **kwargs))
        return captured

    monkeypatch.setattr(ppo, "sample_completions", keep)
    scores = torch.tensor([3.0, -3.0, 0.0, 0.0, 0.0, 0.0])
    record = ppo_iteration(model, head, tok, PROMPTS * 2, PROMPTS * 2, lambda q, r: scores, optimizer, config,
                           torch.Generator().manual_seed(0))
    assert record["score"] == 0.0 and abs(record["kl"]) < 1e-4 and len(record["replies"]) == 6
    mask = captured["completion_mask"]
    with torch.no_grad():
        after, _ = policy_forward(model, head, captured["input_ids"], captured["attention_mask"], mask.shape[1])
    change = ((after - captured["logprobs"]) * mask).sum(dim=1)   # (6,) log pi_new - log pi_old per reply
    assert change[0] > 0.05 and change[1] < -0.05


def test_train_ppo_records_each_iteration_and_the_kl_grows_from_zero():
    torch.manual_seed(0)
    model, tok, head = policy()

    def reward(questions, replies):  # pays for ASCII letters
        return torch.tensor([float(sum(ch.isascii() and ch.isalpha() for ch in r)) for r in replies])

    config = PPOConfig(batch_size=6, minibatches=2, max_new_tokens=6, lr=3e-2, kl_coef=0.0)
    history = train_ppo(model, head, tok, PROMPTS * 2, PROMPTS * 2, reward, iterations=4, config=config)
    assert len(history) == 4 and {"score", "kl", "policy_loss", "length", "replies"} <= set(history[0])
    assert abs(history[0]["kl"]) < 1e-4   # the LoRA starts as the identity: policy == reference
    assert any(abs(h["kl"]) > 1e-3 for h in history[1:])


def test_lora_disabled_is_the_reference():
    model, tok, head = policy()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
        moved = model(input_ids=ids).logits
        with lora_disabled(model):
            reference = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(before, moved)
    assert torch.allclose(before, reference, atol=1e-6) and torch.equal(moved, again)


@pytest.mark.parametrize("change, error", [
    (dict(batch_size=0), ValueError), (dict(minibatches=9), ValueError), (dict(temperature=0), ValueError),
    (dict(kl_coef=-0.1), ValueError), (dict(clip_eps=-0.2), ValueError), (dict(clip_eps=1.5), ValueError),
    (dict(lr=0), ValueError), (dict(gamma=1.5), ValueError), (dict(batch_size=2.0), TypeError),
    (dict(kl_coef="0.1"), TypeError),
])
def test_ppo_config_rejects_bad_values(change, error):
    with pytest.raises(error):
        PPOConfig(**change)


def test_bad_rewards_are_refused():
    model, tok, head = policy()
    optimizer = torch.optim.AdamW(head.parameters())
    for bad in (lambda q, r: torch.tensor([float("nan")] * len(r)), lambda q, r: torch.zeros(len(r) + 1)):
        with pytest.raises(ValueError, match="finite scores"):
            ppo_iteration(model, head, tok, PROMPTS, PROMPTS, bad, optimizer, PPOConfig(batch_size=3, max_new_tokens=3))
    with pytest.raises(ValueError, match="one question per prompt"):
        train_ppo(model, head, tok, PROMPTS, PROMPTS[:2], lambda q, r: torch.zeros(len(r)), iterations=1)
    with pytest.raises(TypeError):
        sample_completions(model, head, tok, "one prompt", 3)


def test_scores_are_normalised_and_a_missing_eos_is_penalised(monkeypatch):
    """With normalize_scores the per-token rewards see (s - mean) / std; a reply cut off at max_new_tokens
    (no eos) loses missing_eos_penalty more. Checked on the rewards ppo_token_rewards receives."""
    import utils.ppo as ppo

    model, tok, head = policy()
    seen = {}

    def spy(scores, *args, **kwargs):
        seen["scores"] = scores.clone()
        return ppo_token_rewards(scores, *args, **kwargs)

    from utils.alignment import ppo_token_rewards
    monkeypatch.setattr(ppo, "ppo_token_rewards", spy)
    raw = torch.tensor([1.0, 2.0, 3.0])
    config = PPOConfig(batch_size=3, minibatches=1, max_new_tokens=2, missing_eos_penalty=0.5)
    ppo_iteration(model, head, tok, PROMPTS, PROMPTS, lambda q, r: raw, torch.optim.AdamW(head.parameters()),
                  config, torch.Generator().manual_seed(0))
    # the random stand-in practically never says eos within 2 tokens: every reply is cut off
    assert torch.allclose(seen["scores"], torch.tensor([-1.0, 0.0, 1.0]) - 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        PPOConfig(missing_eos_penalty=-1.0)
