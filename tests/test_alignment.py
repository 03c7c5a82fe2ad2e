"""utils.alignment: SFT masking and loss, reward-model, PPO and DPO losses, preference metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils.alignment import (
    IGNORE,
    dpo_loss,
    kl_penalized_reward,
    ppo_clipped_objective,
    preference_margin,
    response_logprobs,
    reward_model_loss,
    sft_loss,
    win_rate,
)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-12.0, -30.5, -7.25])
    loss, chosen_r, rejected_r = dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.all(chosen_r == 0) and torch.all(rejected_r == 0)


def test_dpo_loss_known_value():
    # chosen moved up by 2 nats, rejected down by 1: margin = beta * 3; loss = log(1 + exp(-margin))
    loss, chosen_r, rejected_r = dpo_loss(torch.tensor([-8.0]), torch.tensor([-11.0]),
                                          torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.5)
    assert math.isclose(loss.item(), math.log1p(math.exp(-1.5)), rel_tol=1e-6)
    assert math.isclose(chosen_r.item(), 1.0) and math.isclose(rejected_r.item(), -0.5)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-10.0, -20.0], requires_grad=True)
    rejected = torch.tensor([-12.0, -18.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0]))
    loss.backward()
    assert torch.all(chosen.grad < 0)   # gradient descent increases log pi(chosen)
    assert torch.all(rejected.grad > 0)  # ... and decreases log pi(rejected)
    assert torch.allclose(chosen.grad, -rejected.grad)


def test_dpo_loss_falls_as_the_margin_grows_and_is_invariant_to_the_reference_offset():
    ref = torch.tensor([-5.0])
    losses = [dpo_loss(ref + m, ref, ref, ref)[0].item() for m in (-2.0, 0.0, 2.0, 8.0)]
    assert losses == sorted(losses, reverse=True)
    a = dpo_loss(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-5.0]))[0]
    b = dpo_loss(torch.tensor([-103.0]), torch.tensor([-104.0]), torch.tensor([-105.0]), torch.tensor([-105.0]))[0]
    assert torch.allclose(a, b)


@pytest.mark.parametrize("beta", [0, -0.1, float("inf"), "0.1", True])
def test_dpo_loss_rejects_a_bad_beta(beta):
    x = torch.zeros(2)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, beta=beta)


def test_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def test_reward_model_loss():
    assert math.isclose(reward_model_loss(torch.zeros(4), torch.zeros(4)).item(), math.log(2), rel_tol=1e-6)
    # r_c - r_r = 2: -log sigmoid(2) = log(1 + e^-2)
    assert math.isclose(reward_model_loss(torch.tensor([3.0]), torch.tensor([1.0])).item(),
                        math.log1p(math.exp(-2)), rel_tol=1e-6)
    r_c = torch.tensor([0.5, -1.0], requires_grad=True)
    reward_model_loss(r_c, torch.tensor([0.0, 0.0])).backward()
    assert torch.all(r_c.grad < 0)
    with pytest.raises(ValueError):
        reward_model_loss(torch.zeros(2), torch.zeros(3))


def test_ppo_clipping():
    advantage = torch.tensor([1.0])
    old = torch.tensor([0.0])
    inside = ppo_clipped_objective(torch.tensor([math.log(1.1)]), old, advantage, clip=0.2)
    assert math.isclose(inside.item(), 1.1, rel_tol=1e-6)
    outside = ppo_clipped_objective(torch.tensor([math.log(2.0)]), old, advantage, clip=0.2)
    assert math.isclose(outside.item(), 1.2, rel_tol=1e-6)  # no credit beyond 1 + clip
    negative = ppo_clipped_objective(torch.tensor([math.log(0.5)]), old, -advantage, clip=0.2)
    assert math.isclose(negative.item(), -0.8, rel_tol=1e-6)  # min(): the pessimistic side
    with pytest.raises(ValueError):
        ppo_clipped_objective(old, old, advantage, clip=1.5)


def test_kl_penalty():
    out = kl_penalized_reward(torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([-3.0]), kl_coef=0.1)
    assert math.isclose(out.item(), 0.8, rel_tol=1e-6)
    with pytest.raises(ValueError):
        kl_penalized_reward(torch.zeros(1), torch.zeros(1), torch.zeros(1), kl_coef=-1)


def test_sft_loss_counts_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 7]])
    # position 1 predicts token 3, position 2 predicts token 7; position 0's target is ignored
    expected = (F.cross_entropy(logits[0, 1:2], torch.tensor([3])) +
                F.cross_entropy(logits[0, 2:3], torch.tensor([7]))) / 2
    assert torch.allclose(sft_loss(logits, labels), expected)
    with pytest.raises(ValueError):
        sft_loss(logits, torch.full((1, 4), IGNORE))
    with pytest.raises(ValueError):
        sft_loss(logits, labels[:, :3])


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_response_logprobs_equals_the_full_logits_computation():
    model = tiny_llama()
    ids = torch.tensor([[3, 4, 5, 6, 7, 0], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7, IGNORE], [IGNORE, IGNORE, IGNORE, 11, 12, 13]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)  # (B, T, V)
        expected = torch.stack([logp[0, 1, 5] + logp[0, 2, 6] + logp[0, 3, 7],
                                logp[1, 2, 11] + logp[1, 3, 12] + logp[1, 4, 13]])
        total = response_logprobs(model, batch)
        mean = response_logprobs(model, batch, average=True)
    assert torch.allclose(total, expected, atol=1e-5)
    assert torch.allclose(mean, expected / 3, atol=1e-5)
    # the same, through the from-scratch SFT loss on the full logits: mean NLL = -(sum of logps) / count
    with torch.no_grad():
        loss = sft_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert torch.allclose(loss, -expected.sum() / 6, atol=1e-5)


def test_preference_margin_and_win_rate():
    chosen, rejected = torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-2.0, -1.0, -3.0, -9.0])
    assert math.isclose(preference_margin(chosen, rejected), (1 - 1 + 0 + 5) / 4)
    rate, wins, n = win_rate(chosen, rejected)
    assert (rate, wins, n) == (2.5 / 4, 2, 4)  # the tie counts half
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])
