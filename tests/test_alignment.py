"""utils.alignment: SFT, reward-model, DPO, PPO and GRPO losses and advantages; bad input; parity with trl.

Hand-computed small cases first, then masking (value and gradient), then bad input, then the parity tests
that run trl 1.16's own DPOTrainer / GRPOTrainer loss code on the tiny stand-in model (trl is pinned:
these tests fail, never skip, without it).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.standin import tiny_chat_model
from utils.alignment import (
    GRPO_STD_EPS,
    IGNORE,
    completion_logprobs,
    dpo_loss,
    dpo_sft_loss,
    gae_advantages,
    grpo_advantages,
    grpo_loss,
    kl_k3,
    ppo_loss,
    ppo_token_rewards,
    response_logprobs,
    reward_model_loss,
    sft_loss,
    value_loss,
)

# ----------------------------------------------------------------------------------------------
# DPO and the reward model


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
    # two pairs: the loss is the mean over pairs (as trl returns it), not the sum
    loss2, _, _ = dpo_loss(torch.tensor([-8.0, -10.0]), torch.tensor([-11.0, -10.0]),
                           torch.tensor([-10.0, -10.0]), torch.tensor([-10.0, -10.0]), beta=0.5)
    assert math.isclose(loss2.item(), (math.log1p(math.exp(-1.5)) + math.log(2)) / 2, rel_tol=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-10.0, -20.0], requires_grad=True)
    rejected = torch.tensor([-12.0, -18.0], requires_grad=True)
    loss, chosen_r, _ = dpo_loss(chosen, rejected, torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0]))
    loss.backward()
    assert torch.all(chosen.grad < 0)   # gradient descent increases log pi(chosen)
    assert torch.all(rejected.grad > 0)  # ... and decreases log pi(rejected)
    assert torch.allclose(chosen.grad, -rejected.grad)
    assert not chosen_r.requires_grad    # the implicit rewards are for logging, detached


def test_dpo_loss_falls_as_the_margin_grows_and_is_invariant_to_the_reference_offset():
    ref = torch.tensor([-5.0])
    losses = [dpo_loss(ref + m, ref, ref, ref)[0].item() for m in (-2.0, 0.0, 2.0, 8.0)]
    assert losses == sorted(losses, reverse=True)
    a = dpo_loss(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-5.0]))[0]
    b = dpo_loss(torch.tensor([-103.0]), torch.tensor([-104.0]), torch.tensor([-105.0]), torch.tensor([-105.0]))[0]
    assert torch.allclose(a, b)


@pytest.mark.parametrize("beta, error", [(0, ValueError), (-0.1, ValueError), (float("inf"), ValueError),
                                         (float("nan"), ValueError), ("0.1", TypeError), (True, TypeError)])
def test_dpo_loss_rejects_a_bad_beta(beta, error):
    x = torch.zeros(2)
    with pytest.raises(error, match="beta"):
        dpo_loss(x, x, x, x, beta=beta)


def test_dpo_loss_rejects_bad_tensors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), x, x)
    with pytest.raises(ValueError, match="NaN or inf"):
        dpo_loss(torch.tensor([0.0, float("nan")]), x, x, x)
    with pytest.raises(ValueError, match="NaN or inf"):
        dpo_loss(x, x, torch.tensor([0.0, -float("inf")]), x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        dpo_loss([0.0, 0.0], x, x, x)
    with pytest.raises(TypeError, match="floating"):
        dpo_loss(torch.zeros(2, dtype=torch.long), x, x, x)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_dpo_sft_loss_adds_the_mean_chosen_nll():
    pc, pr = torch.tensor([-6.0, -2.0], requires_grad=True), torch.tensor([-9.0, -4.0])
    ref_c, ref_r = torch.tensor([-5.0, -3.0]), torch.tensor([-8.0, -4.5])
    dpo, chosen_r, rejected_r = dpo_loss(pc, pr, ref_c, ref_r, beta=0.5)
    loss, chosen_r2, rejected_r2 = dpo_sft_loss(pc, pr, ref_c, ref_r, torch.tensor([3, 1]), beta=0.5, sft_weight=0.2)
    assert abs(loss.item() - (dpo.item() + 0.2 * 8.0 / 4)) < 1e-6    # NLL: 8 nats over 4 chosen tokens
    assert torch.equal(chosen_r, chosen_r2) and torch.equal(rejected_r, rejected_r2)
    x = torch.tensor([-6.0])                                         # the docstring's example
    assert abs(dpo_sft_loss(x, x - 1, x, x - 1, torch.tensor([3]))[0].item() - (math.log(2) + 2)) < 1e-6
    assert dpo_sft_loss(pc, pr, ref_c, ref_r, torch.tensor([3, 1]), sft_weight=0.0)[0].item() == \
        dpo_loss(pc, pr, ref_c, ref_r)[0].item()
    for bad, error in [(dict(sft_weight=-1.0), ValueError), (dict(chosen_tokens=torch.tensor([3])), ValueError),
                       (dict(chosen_tokens=torch.tensor([3, 0])), ValueError), (dict(chosen_tokens=[3, 1]), TypeError)]:
        args = dict(chosen_tokens=torch.tensor([3, 1])) | bad
        with pytest.raises(error):
            dpo_sft_loss(pc, pr, ref_c, ref_r, **args)


def test_reward_model_loss():
    assert math.isclose(reward_model_loss(torch.zeros(4), torch.zeros(4)).item(), math.log(2), rel_tol=1e-6)
    # r_c - r_r = 2: -log sigmoid(2) = log(1 + e^-2)
    assert math.isclose(reward_model_loss(torch.tensor([3.0]), torch.tensor([1.0])).item(),
                        math.log1p(math.exp(-2)), rel_tol=1e-6)
    r_c = torch.tensor([0.5, -1.0], requires_grad=True)
    reward_model_loss(r_c, torch.tensor([0.0, 0.0])).backward()
    assert torch.all(r_c.grad < 0)
    with pytest.raises(ValueError, match="shape"):
        reward_model_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        reward_model_loss(torch.tensor([float("nan")]), torch.zeros(1))


# ----------------------------------------------------------------------------------------------
# GRPO advantages


def test_grpo_advantages_hand_computed_2x3():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    # group 0: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3); group 1: mean 1, std 1
    s0 = math.sqrt(1 / 3) + 1e-4
    expected = torch.tensor([[(2 / 3) / s0, (-1 / 3) / s0, (-1 / 3) / s0],
                             [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)]])
    out = grpo_advantages(rewards)
    assert out.shape == (2, 3)
    assert torch.allclose(out, expected, atol=1e-6)
    # the unbiased (n - 1) std, as torch.std and trl's nanstd; the biased one would give 1.41 for group 0
    assert torch.allclose(out, (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + GRPO_STD_EPS))
    assert torch.allclose(out.sum(dim=1), torch.zeros(2), atol=1e-6)  # centred


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.3, -7.7, 1e6 + 0.1])
def test_grpo_advantages_equal_groups_give_exact_zeros(value):
    rewards = torch.tensor([[value] * 7, [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    out = grpo_advantages(rewards)
    assert torch.equal(out[0], torch.zeros(7))  # exactly 0, not 1e-4 from a rounded mean
    assert not torch.isnan(out).any()
    assert (out[1] != 0).all()


def test_grpo_advantages_scale_options_and_int_rewards():
    rewards = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0]])  # a verifier's 0/1 ints
    centred = rewards.float() - rewards.float().mean(1, keepdim=True)
    assert torch.allclose(grpo_advantages(rewards, scale="none"), centred)
    assert torch.allclose(grpo_advantages(rewards, scale="batch"), centred / (rewards.float().std() + 1e-4))
    assert torch.allclose(grpo_advantages(rewards.bool()), grpo_advantages(rewards.float()))
    assert grpo_advantages(rewards.double()).dtype == torch.float64


@pytest.mark.parametrize("rewards, error", [
    ([[1.0, 0.0]], TypeError),
    (torch.tensor([1.0, 0.0, 1.0]), ValueError),              # 1-D: which are the groups?
    (torch.tensor([[1.0], [0.0]]), ValueError),               # group of one: no baseline
    (torch.tensor([[1.0, float("nan")]]), ValueError),
    (torch.tensor([[1.0, float("inf")]]), ValueError),
    (torch.zeros(0, 4), ValueError),
])
def test_grpo_advantages_rejects_bad_rewards(rewards, error):
    with pytest.raises(error):
        grpo_advantages(rewards)


def test_grpo_advantages_rejects_an_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(torch.zeros(2, 2), scale="std")


# ----------------------------------------------------------------------------------------------
# PPO / GRPO losses


def test_ppo_loss_hand_computed_and_clipped_on_both_sides():
    eps = 0.2
    # four tokens of one response: (ratio, advantage) chosen to hit each case of min(r A, clip(r) A)
    ratios = torch.tensor([[1.1, 2.0, 0.5, 0.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    new = torch.log(ratios).requires_grad_()
    loss = ppo_loss(new, torch.zeros(1, 4), adv, torch.ones(1, 4), clip_eps=eps)
    # inside: -1.1; A > 0 above 1 + eps: clipped to -1.2; A > 0 below 1 - eps: min keeps 0.5 (no clip
    # for the side that hurts); A < 0 below 1 - eps: clipped to 0.8
    assert math.isclose(loss.item(), (-1.1 - 1.2 - 0.5 + 0.8) / 4, rel_tol=1e-6)
    loss.backward()
    # d loss / d log pi = -ratio * A / N where unclipped, 0 where clipped
    assert torch.allclose(new.grad, torch.tensor([[-1.1, 0.0, -0.5, 0.0]]) / 4, atol=1e-6)


def test_ppo_loss_asymmetric_clip_range():
    new = torch.log(torch.tensor([[1.25, 1.35]]))
    loss = ppo_loss(new, torch.zeros(1, 2), torch.tensor(1.0), torch.ones(1, 2), clip_eps=0.2, clip_eps_high=0.28)
    assert math.isclose(loss.item(), -(1.25 + 1.28) / 2, rel_tol=1e-6)


def test_ppo_loss_treats_old_logprobs_as_a_constant():
    # first PPO epoch: old == new. Detaching old keeps the policy gradient (-A per token) instead of ratio == 1
    new = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = ppo_loss(new, new, torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    assert torch.allclose(new.grad, torch.tensor([[-1.0, -1.0]]))


def test_token_and_sequence_aggregation():
    # response 0 has 3 counted tokens with per-token loss -1 each (ratio 1, A = 1); response 1 has 1, loss +2
    new = torch.zeros(2, 3)
    adv = torch.tensor([[1.0], [-2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    token = ppo_loss(new, new, adv, mask)
    sequence = ppo_loss(new, new, adv, mask, aggregation="sequence")
    assert math.isclose(token.item(), (-3 + 2) / 4, rel_tol=1e-6)        # every token weighs the same
    assert math.isclose(sequence.item(), (-1 + 2) / 2, rel_tol=1e-6)     # every response weighs the same
    with pytest.raises(ValueError, match="aggregation"):
        ppo_loss(new, new, adv, mask, aggregation="sum")


@pytest.mark.parametrize("garbage", [123.0, -1e30, float("nan"), float("inf"), -float("inf")])
def test_masked_tokens_change_neither_value_nor_gradient(garbage):
    torch.manual_seed(0)
    new, old, ref = (torch.randn(3, 5) * 0.3 - 2 for _ in range(3))
    adv = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    dirty = {name: torch.where(mask.bool(), t, garbage) for name, t in [("new", new), ("old", old),
                                                                        ("ref", ref), ("adv", adv)]}
    for fn, extra in [(ppo_loss, {}), (grpo_loss, {"beta": 0.1}), (ppo_loss, {"aggregation": "sequence"})]:
        results = []
        for t in (dict(new=new, old=old, ref=ref, adv=adv), dirty):
            leaf = t["new"].clone().requires_grad_()
            args = (leaf, t["old"], t["ref"], t["adv"], mask) if fn is grpo_loss else (leaf, t["old"], t["adv"], mask)
            loss = fn(*args, **extra)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        (clean_loss, clean_grad), (dirty_loss, dirty_grad) = results
        assert torch.isfinite(dirty_loss) and torch.equal(clean_loss, dirty_loss)
        assert torch.equal(clean_grad, dirty_grad)
        assert torch.all(dirty_grad[~mask.bool()] == 0) and (dirty_grad[mask.bool()] != 0).any()


def test_advantage_shapes_broadcast_per_response():
    torch.manual_seed(1)
    new, old = torch.randn(4, 4) * 0.1, torch.randn(4, 4) * 0.1   # B == T: (B,) must not broadcast along T
    mask = torch.ones(4, 4)
    per_response = torch.tensor([1.0, -1.0, 0.5, 2.0])
    expected = ppo_loss(new, old, per_response[:, None].expand(4, 4).clone(), mask)
    assert torch.equal(ppo_loss(new, old, per_response, mask), expected)
    assert torch.equal(ppo_loss(new, old, per_response[:, None], mask), expected)
    assert torch.equal(ppo_loss(new, old, torch.tensor(0.5), mask), ppo_loss(new, old, torch.full((4, 4), 0.5), mask))
    assert torch.equal(ppo_loss(new, old, torch.tensor([1, -1, 0, 2]), mask),
                       ppo_loss(new, old, torch.tensor([1.0, -1.0, 0.0, 2.0]), mask))
    with pytest.raises(ValueError, match="one value per response"):
        ppo_loss(new, old, torch.ones(3), mask)
    with pytest.raises(ValueError, match="advantages must be"):
        ppo_loss(new, old, torch.ones(4, 3), mask)


def test_ppo_loss_rejects_bad_input():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    cases = [
        (dict(clip_eps=0), ValueError), (dict(clip_eps=-0.2), ValueError), (dict(clip_eps=1.0), ValueError),
        (dict(clip_eps="0.2"), TypeError), (dict(clip_eps_high=-0.1), ValueError),
        (dict(mask=torch.tensor([[1, 2, 0], [1, 1, 1]])), ValueError),
        (dict(mask=torch.tensor([[1, 0.5, 0], [1, 1, 1]])), ValueError),
        (dict(mask=torch.zeros(2, 3)), ValueError), (dict(mask=torch.ones(6)), ValueError),
        (dict(mask=[[1, 1, 1], [1, 1, 1]]), TypeError),
        (dict(new_logprobs=torch.zeros(2, 4)), ValueError),
        (dict(old_logprobs=torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])), ValueError),
        (dict(new_logprobs=torch.tensor([[0.0, 0.0, 0.0], [0.0, -float("inf"), 0.0]])), ValueError),
        (dict(advantages=torch.tensor([1.0, float("nan")])), ValueError),
        (dict(new_logprobs=torch.zeros(2, 3, dtype=torch.long)), TypeError),
        (dict(new_logprobs=x.tolist()), TypeError), (dict(advantages=1.0), TypeError),
    ]
    for change, error in cases:
        args = dict(new_logprobs=x, old_logprobs=x, advantages=torch.ones(2), mask=mask) | change
        with pytest.raises(error):
            ppo_loss(**args)


def test_grpo_loss_is_ppo_loss_plus_beta_k3():
    torch.manual_seed(2)
    new, old, ref = (torch.randn(2, 3) * 0.2 - 1 for _ in range(3))
    adv, mask = torch.tensor([0.7, -1.2]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(grpo_loss(new, old, None, adv, mask, beta=0.0), ppo_loss(new, old, adv, mask))
    kl = ((torch.exp(ref - new) - (ref - new) - 1) * mask).sum() / mask.sum()
    assert torch.allclose(grpo_loss(new, old, ref, adv, mask, beta=0.3), ppo_loss(new, old, adv, mask) + 0.3 * kl)
    # one token, ratio 1, A = 0, new - ref = log 2: only the KL term, beta * (1/2 + log 2 - 1)
    one = torch.tensor([[math.log(0.5)]])
    value = grpo_loss(one, one, one - math.log(2), torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)
    assert math.isclose(value.item(), 0.1 * (0.5 + math.log(2) - 1), rel_tol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(new, old, ref, adv, mask, beta=-0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(new, old, None, adv, mask, beta=0.04)


def test_kl_k3():
    new = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(kl_k3(new, new), torch.zeros(3))
    ref = torch.tensor([-1.5, -0.1, -3.0])
    out = kl_k3(new, ref)
    assert torch.allclose(out, torch.exp(ref - new) - (ref - new) - 1) and (out > 0).all()
    half = kl_k3(torch.tensor([math.log(2)]), torch.tensor([0.0]))   # ref/pi = 1/2
    assert math.isclose(half.item(), 0.5 - math.log(0.5) - 1, rel_tol=1e-6)
    with pytest.raises(ValueError):
        kl_k3(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError):
        kl_k3(torch.tensor([float("nan")]), torch.zeros(1))


# ----------------------------------------------------------------------------------------------
# PPO with a value head: per-token rewards, GAE, value loss


def test_ppo_token_rewards():
    scores = torch.tensor([1.0, -2.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 9.9]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])   # row 1 ends one token early: its score goes on token 1
    out = ppo_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(out, torch.tensor([[-0.05, 0.0, 0.05 + 1.0], [-0.1, -0.2 - 2.0, 0.0]]))
    with pytest.raises(ValueError, match="scores"):
        ppo_token_rewards(torch.zeros(3), logp, ref, mask)
    with pytest.raises(ValueError, match="at least one 1"):
        ppo_token_rewards(scores, logp, ref, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="kl_coef"):
        ppo_token_rewards(scores, logp, ref, mask, kl_coef=-0.1)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.3]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.3                       # last token: V after it is 0
    d1 = 0.0 + gamma * 0.3 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.1
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=gamma, lam=lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + values)
    # lam = 1, gamma = 1: the advantage is the sum of future rewards minus V (Monte Carlo)
    adv1, ret1 = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, torch.tensor([[0.9, 0.8, 0.7]])) and torch.allclose(ret1, torch.ones(1, 3))


def test_gae_padding_on_either_side_changes_nothing():
    torch.manual_seed(3)
    r, v = torch.randn(1, 4), torch.randn(1, 4)
    adv, ret = gae_advantages(r, v, torch.ones(1, 4), gamma=0.95, lam=0.9)
    nan = torch.full((1, 2), float("nan"))
    for rewards, values, mask, keep in [
        (torch.cat([r, nan], 1), torch.cat([v, nan], 1), torch.tensor([[1, 1, 1, 1, 0, 0]]), slice(0, 4)),
        (torch.cat([nan, r], 1), torch.cat([nan, v], 1), torch.tensor([[0, 0, 1, 1, 1, 1]]), slice(2, 6)),
    ]:
        padded_adv, padded_ret = gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
        assert torch.allclose(padded_adv[:, keep], adv) and torch.allclose(padded_ret[:, keep], ret)
        assert torch.all(padded_adv[mask == 0] == 0) and torch.all(padded_ret[mask == 0] == 0)


def test_gae_rejects_bad_input():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="contiguous"):
        gae_advantages(x, x, torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(x, x, torch.ones(1, 4), gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(x, x, torch.ones(1, 4), lam=-0.1)
    with pytest.raises(ValueError, match="NaN"):
        gae_advantages(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), x, torch.ones(1, 4))


def test_value_loss():
    values = torch.tensor([[1.0, 2.0, 50.0]], requires_grad=True)
    loss = value_loss(values, torch.tensor([[0.0, 2.0, float("nan")]]), torch.tensor([[1, 1, 0]]))
    assert math.isclose(loss.item(), 0.25, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.5, 0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------
# SFT and log-probabilities


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


def test_completion_logprobs_equals_the_full_logits_computation():
    model = tiny_llama()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits              # (B, T, V)
        out = completion_logprobs(model, ids, attention, n_completion=2)
        hot = completion_logprobs(model, ids, attention, n_completion=2, temperature=0.7)
    for t, logp in [(1.0, out), (0.7, hot)]:
        full = torch.log_softmax(logits / t, dim=-1)
        expected = torch.stack([full[:, 3].gather(1, ids[:, 4:5]).squeeze(1),      # position 3 predicts 4
                                full[:, 4].gather(1, ids[:, 5:6]).squeeze(1)], dim=1)
        assert logp.shape == (2, 2) and torch.allclose(logp, expected, atol=1e-5)
    with pytest.raises(ValueError, match="n_completion"):
        completion_logprobs(model, ids, attention, n_completion=6)


# ----------------------------------------------------------------------------------------------
# Parity with trl 1.16: its own trainers' loss code on the tiny stand-in model, no hub access


def _grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("sft_weight", [None, 0.5])
def test_dpo_loss_matches_trl_dpo_trainer(tmp_path, sft_weight):
    """Compared: trl.DPOTrainer.compute_loss (loss_type "sigmoid", beta 0.25, float32: trl's default bf16
    autocast is turned off) on one collated batch of 3
    preference pairs, policy = tiny_chat_model(seed 0), reference = tiny_chat_model(seed 1), versus our
    dpo_loss on response_logprobs of the same batch under the same two models. Same loss, same gradient
    w.r.t. every policy weight, same implicit rewards (trl's logged means), each to 1e-5. With sft_weight:
    trl's loss_type ["sigmoid", "sft"], loss_weights [1, sft_weight] versus our dpo_sft_loss (RPO)."""
    import trl  # noqa: F401  (pinned in requirements.txt: a missing trl is a failure, not a skip)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, tokenizer = tiny_chat_model(seed=0)
    reference, _ = tiny_chat_model(seed=1)
    pairs = Dataset.from_dict({"prompt": ["What is 2+2?", "Name a colour.", "Say hi."],
                               "chosen": [" 4", " Blue, like the sky.", " Hi!"],
                               "rejected": [" 5 or so", " Dog", " No."]})
    losses = dict(loss_type=["sigmoid"]) if sft_weight is None else dict(loss_type=["sigmoid", "sft"],
                                                                         loss_weights=[1.0, sft_weight])
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=0.25, **losses,
                     per_device_train_batch_size=3, logging_strategy="no", save_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs,
                         processing_class=tokenizer)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])  # rows: 3 chosen, then 3 rejected
    trl_loss = trainer.compute_loss(trainer.model, batch)

    ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)}
    policy_chosen, policy_rejected = response_logprobs(trainer.model, ours_batch).chunk(2)
    with torch.no_grad():
        reference_chosen, reference_rejected = response_logprobs(trainer.ref_model, ours_batch).chunk(2)
    loss, chosen_r, rejected_r = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                          beta=0.25)
    assert abs(loss.item() - math.log(2)) > 0.01  # the two models differ: not the trivial log 2
    if sft_weight is not None:
        chosen_tokens = (ours_batch["labels"][:3, 1:] != IGNORE).sum(dim=1)      # (3,) tokens of each chosen
        loss, _, _ = dpo_sft_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                  chosen_tokens, beta=0.25, sft_weight=sft_weight)
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    metrics = trainer._metrics["train"]
    assert abs(chosen_r.mean().item() - metrics["rewards/chosen"][-1]) < 1e-5
    assert abs(rejected_r.mean().item() - metrics["rewards/rejected"][-1]) < 1e-5
    assert (_grads(loss, trainer.model) - _grads(trl_loss, trainer.model)).abs().max() < 1e-5


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory):
    """A trl GRPOTrainer on the tiny stand-in (saved to a temporary folder: trl builds its reference model
    from a path; float32, bf16 autocast off) and one generation batch: 3 prompts x 4 sampled completions of 8 tokens, scored by a
    deterministic reward (the count of ASCII characters), with the rewards trl received recorded."""
    import trl  # noqa: F401  (pinned in requirements.txt: a missing trl is a failure, not a skip)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    folder = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_chat_model(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    received = []

    def ascii_reward(completions, **kwargs):
        rewards = [float(sum(ch.isascii() for ch in text)) for text in completions]
        received.extend(rewards)
        return rewards

    prompts = ["What is 2+2?", "Name a colour.", "Say hi."]
    args = GRPOConfig(output_dir=str(folder / "out"), report_to="none", use_cpu=True, bf16=False, seed=0, beta=0.04,
                      epsilon=0.2, epsilon_high=0.28, num_generations=4, per_device_train_batch_size=12,
                      max_completion_length=8, logging_strategy="no", save_strategy="no")
    trainer = GRPOTrainer(model=str(folder), reward_funcs=ascii_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before each step
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(4)])
    return trainer, batch, torch.tensor(received).view(3, 4)


def test_grpo_advantages_match_trl(grpo_setup):
    """Compared: the advantages trl's GRPOTrainer._generate_and_score_completions computed for its own
    12 sampled completions (scale_rewards "group") versus grpo_advantages on the rewards it received."""
    _, batch, rewards = grpo_setup
    ours = grpo_advantages(rewards).reshape(-1)
    assert rewards.std(dim=1).max() > 0  # some group carries signal
    assert (ours - batch["advantages"]).abs().max() < 1e-5


@pytest.mark.parametrize("loss_type, aggregation, kl_weight", [
    ("dapo", "token", True),       # trl 1.16's defaults: loss_type "dapo", use_bias_correction_kl=True
    ("bnpo", "token", False),
    ("grpo", "sequence", False),   # the GRPO paper's per-response mean, plain k3
])
def test_grpo_loss_matches_trl(grpo_setup, loss_type, aggregation, kl_weight):
    """Compared: trl's GRPOTrainer.compute_loss (beta 0.04, epsilon 0.2, epsilon_high 0.28, the given
    loss_type and use_bias_correction_kl) versus our grpo_loss on completion_logprobs of the same model, on trl's generation batch
    with three changes so that every branch matters: rows 1, 5 and 9 are cut short by the completion mask
    (num_items_in_batch recounted, as trl counts it), old and reference log-probs are the current ones
    plus fixed noise (ratios on both sides of the clip range, a nonzero KL). Loss and gradient to 1e-5."""
    trainer, generated, _ = grpo_setup
    batch = dict(generated)
    mask = batch["completion_mask"].clone()
    mask[1, 5:], mask[5, 2:], mask[9, 7:] = 0, 0, 0
    batch["completion_mask"], batch["num_items_in_batch"] = mask, mask.sum()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], mask], dim=1)
    new = completion_logprobs(trainer.model, input_ids, attention, batch["completion_ids"].shape[1])  # (12, 8)
    noise = torch.Generator().manual_seed(0)
    batch["old_per_token_logps"] = new.detach() + 0.3 * torch.randn(new.shape, generator=noise)
    batch["ref_per_token_logps"] = new.detach() + 0.5 * torch.randn(new.shape, generator=noise)
    trainer.loss_type, trainer.args.use_bias_correction_kl = loss_type, kl_weight
    trl_loss = trainer.compute_loss(trainer.model, batch)
    loss = grpo_loss(new, batch["old_per_token_logps"], batch["ref_per_token_logps"], batch["advantages"], mask,
                     clip_eps=0.2, clip_eps_high=0.28, beta=0.04, aggregation=aggregation,
                     kl_importance_weight=kl_weight)
    ratio = torch.exp(new.detach() - batch["old_per_token_logps"])[mask.bool()]
    assert (ratio < 0.8).any() and (ratio > 1.28).any()  # both clip bounds are exercised
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert (_grads(loss, trainer.model) - _grads(trl_loss, trainer.model)).abs().max() < 1e-5


def test_reward_model_matches_trl_reward_trainer(tmp_path):
    """Compared: trl.RewardTrainer.compute_loss on one collated batch of 3 (chosen, rejected) pairs, with a
    LlamaForSequenceClassification (num_labels=1, the model trl trains) built on tiny_chat_model's trunk,
    versus utils.reward_model.RewardModel on the same trunk with the same head weights, fed the same token
    ids: the same scores (HF pools the last non-pad token, as our last_token_index), and reward_model_loss
    on them equals trl's loss, each to 1e-5."""
    import copy

    import trl  # noqa: F401  (pinned in requirements.txt: a missing trl is a failure, not a skip)
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from utils.reward_model import RewardModel

    causal, tokenizer = tiny_chat_model(seed=0)
    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    classifier = LlamaForSequenceClassification(config)
    classifier.model.load_state_dict(causal.model.state_dict())
    torch.manual_seed(0)
    torch.nn.init.normal_(classifier.score.weight, std=1.0)
    pairs = Dataset.from_dict({"chosen": ["Paris is the capital.", "Four.", "Blue."],
                               "rejected": ["I think it might be Lyon, or maybe not.", "5", "Dog"]})
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                        per_device_train_batch_size=3, logging_strategy="no", save_strategy="no")
    trainer = RewardTrainer(model=classifier, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])  # 3 chosen rows, then 3 rejected
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: the pooling position matters
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))

    rm = RewardModel(causal, tokenizer)
    with torch.no_grad():
        rm.head.weight.copy_(classifier.score.weight)   # HF's score layer has no bias; ours starts at 0
        ours = rm(batch["input_ids"], batch["attention_mask"])
        theirs = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
    chosen, rejected = ours.chunk(2)
    assert abs(reward_model_loss(chosen, rejected).item() - trl_loss.item()) < 1e-5
    assert abs(trl_loss.item() - math.log(2)) > 0.01  # not the trivial all-equal case
