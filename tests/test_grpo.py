"""utils.grpo: verifiable rewards, group sampling, the LoRA-off reference, one GRPO step, bad input, and
one step of ours against trl 1.16's GRPOTrainer loss on the same tensors (tiny stand-in model, no hub)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.standin import ScriptedModel, tiny_chat_model, tiny_tokenizer
from utils.alignment import completion_logprobs
from utils.grpo import (
    add_lora_top,
    evaluate,
    exact_integer_reward,
    format_and_label_reward,
    grpo_step,
    left_pad,
    lora_disabled,
    mentions_integer_reward,
    mentions_label_reward,
    reply_label,
    rollout_logprobs,
    sample_groups,
    score,
    select_groups,
    train_grpo,
)
from utils.lora import lora_layers

PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Say 7."}]]


def adapted_model(seed: int = 0, n_layers: int = 1):
    """The tiny stand-in with LoRA on its top block, B set to random values so that policy != reference."""
    model, tokenizer = tiny_chat_model(seed)
    torch.manual_seed(seed)                  # LoRA's A starts random: the same whichever tests ran before
    add_lora_top(model, n_layers, ("q_proj", "v_proj"), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g))
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Rewards


@pytest.mark.parametrize("reply, answer, expected", [
    ("15", 15, 1.0), (" 15. ", 15, 1.0), ("-3", -3, 1.0), ("15", 16, 0.0), ("7 + 8 = 15", 15, 0.0),
    ("The answer is 15.", 15, 0.0), ("15 16", 15, 0.0), ("", 15, 0.0), ("1 5", 15, 0.0), ("015", 15, 1.0),
])
def test_exact_integer_reward(reply, answer, expected):
    assert exact_integer_reward(reply, answer) == expected


@pytest.mark.parametrize("reply, answer, expected", [
    ("15", 15, 1.0), ("7 + 8 = 15", 15, 1.0), ("14 15 16 17", 15, 1.0), ("150", 15, 0.0), ("1.5", 15, 0.0),
    ("15.", 15, 1.0), ("no number", 15, 0.0), ("-15", 15, 0.0),
])
def test_mentions_integer_reward_is_fooled_by_lists(reply, answer, expected):
    assert mentions_integer_reward(reply, answer) == expected


def test_a_degenerate_list_beats_the_flawed_reward_but_not_the_strict_one():
    listing = " ".join(str(n) for n in range(19))       # every possible sum of two digits
    answers = [a + b for a in range(10) for b in range(10)]
    assert all(mentions_integer_reward(listing, x) == 1.0 for x in answers)
    assert all(exact_integer_reward(listing, x) == 0.0 for x in answers)


def test_reward_bad_input():
    with pytest.raises(TypeError):
        exact_integer_reward(15, 15)
    with pytest.raises(TypeError):
        mentions_integer_reward("15", 15.0)
    with pytest.raises(TypeError):
        exact_integer_reward("15", True)


@pytest.mark.parametrize("reply, answer, expected", [
    ("negative", "negative", 1.5), (" Negative. ", "negative", 1.5), ("POSITIVE", "positive", 1.5),
    ("positive", "negative", 0.5), ("Positive.", "negative", 0.5), ("This review is negative.", "negative", 0.0),
    ("negative or positive", "negative", 0.0), ("", "negative", 0.0), ("negatives", "negative", 0.0),
    ("negative..", "negative", 0.0),
])
def test_format_and_label_reward(reply, answer, expected):
    assert format_and_label_reward(reply, answer) == expected


def test_reply_label():
    assert reply_label("Negative.") == "negative"
    assert reply_label("yes", ("yes", "no")) == "yes"
    assert reply_label("It is negative.") is None and reply_label("maybe", ("yes", "no")) is None


@pytest.mark.parametrize("reply, answer, expected", [
    ("negative", "negative", 1.0), ("This review is negative.", "negative", 1.0),
    ("positive or negative", "negative", 1.0), ("positive or negative", "positive", 1.0),
    ("positive", "negative", 0.0), ("negatively", "negative", 0.0), ("", "positive", 0.0),
])
def test_mentions_label_reward_is_fooled_by_naming_both_labels(reply, answer, expected):
    assert mentions_label_reward(reply, answer) == expected


def test_label_rewards_bad_input():
    with pytest.raises(ValueError, match="answer"):
        format_and_label_reward("positive", "neutral")          # not one of the labels
    with pytest.raises(ValueError):
        mentions_label_reward("positive", "Positive")           # labels are lowercase names
    with pytest.raises(TypeError):
        format_and_label_reward(1, "positive")
    with pytest.raises(TypeError):
        mentions_label_reward(None, "positive")
    with pytest.raises(TypeError):
        reply_label("positive", "positive")                     # one string is not a list of labels
    with pytest.raises(ValueError, match="one of"):
        format_and_label_reward("positive", 1)                 # utils.checks.check_choice: not a label


def test_score():
    assert torch.equal(score(["3", "4", "x"], [3, 3, 3], exact_integer_reward), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="one answer per reply"):
        score(["3"], [3, 4], exact_integer_reward)
    with pytest.raises(TypeError, match="reward_fn"):
        score(["3"], [3], "exact")
    with pytest.raises(ValueError, match="NaN"):
        score(["3"], [3], lambda reply, answer: float("nan"))


# ----------------------------------------------------------------------------------------------
# Sampling groups


def test_left_pad():
    ids, mask = left_pad([[5], [6, 7]], pad_id=0)
    assert ids.tolist() == [[0, 5], [6, 7]] and mask.tolist() == [[0, 1], [1, 1]]


def test_sample_groups_shapes_masks_and_old_logprobs():
    model, tokenizer = adapted_model()
    g = torch.Generator().manual_seed(0)
    rollout = sample_groups(model, tokenizer, PROMPTS, group_size=3, max_new_tokens=6, temperature=0.8, generator=g)
    n, tc = rollout.completion_ids.shape
    assert n == 6 and tc <= 6 and rollout.prompt_ids.shape == rollout.prompt_mask.shape
    assert len(rollout.texts) == 6 and rollout.group_size == 3
    # rows of one group share their prompt; the two prompts differ in length: left padding on the shorter
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[2]) and not torch.equal(rollout.prompt_ids[0],
                                                                                        rollout.prompt_ids[3])
    assert (rollout.prompt_mask[:, -1] == 1).all() and (rollout.prompt_mask == 0).any()
    mask = rollout.completion_mask
    assert (mask[:, 0] == 1).all() and (mask[:, 1:] <= mask[:, :-1]).all()     # one run of 1s from the start
    eos = tokenizer.eos_token_id
    for row, m in zip(rollout.completion_ids, mask):
        ended = (row == eos).nonzero()
        if len(ended):   # the end token is the last counted token
            assert int(m.sum()) == int(ended[0]) + 1
    # old log-probs: those of a full forward over prompt + completion at the sampling temperature
    with torch.no_grad():
        full = rollout_logprobs(model, rollout, temperature=0.8)
    assert torch.allclose(full * mask, rollout.old_logprobs, atol=1e-5)
    assert (rollout.old_logprobs[mask == 0] == 0).all() and (rollout.old_logprobs[mask == 1] < 0).all()


def test_sample_groups_is_reproducible_and_follows_a_scripted_model():
    model, tokenizer = adapted_model()
    runs = [sample_groups(model, tokenizer, PROMPTS, 2, 5, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids) and runs[0].texts == runs[1].texts
    tok = tiny_tokenizer()
    scripted = sample_groups(ScriptedModel(tok, "42"), tok, PROMPTS, 3, 8, generator=torch.Generator().manual_seed(0))
    assert scripted.texts == ["42"] * 6
    assert scripted.completion_mask.sum(1).tolist() == [3] * 6      # "4", "2", end token


@pytest.mark.parametrize("kwargs, error", [
    (dict(group_size=1), ValueError), (dict(group_size=2.0), TypeError), (dict(max_new_tokens=0), ValueError),
    (dict(temperature=0.0), ValueError), (dict(temperature=-1.0), ValueError), (dict(top_p=1.5), ValueError),
])
def test_sample_groups_bad_input(kwargs, error):
    model, tokenizer = tiny_chat_model()
    args = dict(group_size=2, max_new_tokens=4) | kwargs
    with pytest.raises(error):
        sample_groups(model, tokenizer, PROMPTS, **args)


# ----------------------------------------------------------------------------------------------
# The reference: the same model with its adapters off


def test_lora_disabled_is_the_base_model_and_restores_the_adapters():
    base, tokenizer = tiny_chat_model(0)
    model, _ = adapted_model(0)
    ids = torch.tensor([tokenizer.encode("What is 2 + 2? 4", add_special_tokens=False)])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        adapted = completion_logprobs(model, ids, attention, 3)
        with lora_disabled(model):
            off = completion_logprobs(model, ids, attention, 3)
        again = completion_logprobs(model, ids, attention, 3)
        plain = completion_logprobs(base, ids, attention, 3)
    assert torch.allclose(off, plain, atol=1e-6)
    assert torch.equal(adapted, again) and not torch.allclose(adapted, plain, atol=1e-3)
    with pytest.raises(ValueError, match="no LoRA"):
        with lora_disabled(base):
            pass


def test_add_lora_top_adapts_only_the_top_blocks():
    model, _ = tiny_chat_model()
    add_lora_top(model, 1, ("q_proj", "v_proj"), r=2, alpha=4)
    assert sorted(lora_layers(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and ".layers.1." in name for name in trainable)
    fresh, _ = tiny_chat_model()
    with pytest.raises(ValueError, match="n_layers"):
        add_lora_top(fresh, 3)
    with pytest.raises(ValueError):
        add_lora_top(fresh, 1, ("nope",))
    with pytest.raises(ValueError):
        add_lora_top(fresh, 1, r=0)


# ----------------------------------------------------------------------------------------------
# One GRPO step


def rollout_and_rewards(seed=0):
    model, tokenizer = adapted_model(seed)
    rollout = sample_groups(model, tokenizer, PROMPTS, 3, 6, generator=torch.Generator().manual_seed(seed))
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])   # group 2 is flat: no signal
    return model, tokenizer, rollout, rewards


def test_grpo_step_moves_only_the_adapters_towards_the_rewarded_answer():
    model, _, rollout, rewards = rollout_and_rewards()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        before = (rollout_logprobs(model, rollout) * rollout.completion_mask).sum(1)   # (N,) log pi(reply)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    stats = grpo_step(model, optimizer, rollout, rewards, beta=0.0)
    with torch.no_grad():
        after = (rollout_logprobs(model, rollout) * rollout.completion_mask).sum(1)
    assert after[0] > before[0] and after[1] < before[1] and after[2] < before[2]  # rewarded up, others down
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert stats["groups_with_signal"] == 0.5 and math.isclose(stats["reward"], 2.5 / 6, rel_tol=1e-6)
    assert math.isnan(stats["kl"]) and stats["clipped"] == 0.0


def test_flat_groups_are_skipped_only_when_asked():
    model, _, rollout, _ = rollout_and_rewards()
    flat = torch.full((2, 3), 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    snapshot = [p.detach().clone() for p in params]
    stats = grpo_step(model, torch.optim.SGD(params, lr=0.1), rollout, flat, beta=0.04, skip_flat_groups=True)
    assert math.isnan(stats["loss"]) and all(torch.equal(p, s) for p, s in zip(params, snapshot))
    # without skipping, the KL term alone pulls the adapted policy back towards the reference
    stats = grpo_step(model, torch.optim.SGD(params, lr=0.1), rollout, flat, beta=0.04)
    assert stats["kl"] > 0 and not all(torch.equal(p, s) for p, s in zip(params, snapshot))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_groups_per_pass_gives_the_same_update(beta):
    """Gradient accumulation over one group at a time = the update of all groups in one pass."""
    results = []
    for groups_per_pass in (None, 1):
        model, _, rollout, _ = rollout_and_rewards()
        rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]])     # both groups carry a signal
        params = [p for p in model.parameters() if p.requires_grad]
        stats = grpo_step(model, torch.optim.SGD(params, lr=0.0), rollout, rewards, beta=beta,
                          max_grad_norm=1e9, groups_per_pass=groups_per_pass)
        results.append((stats, [p.grad.clone() for p in params]))
    (full, full_grads), (parts, part_grads) = results
    assert abs(full["loss"] - parts["loss"]) < 1e-6 and full["loss"] != 0.0
    assert max((a - b).abs().max().item() for a, b in zip(full_grads, part_grads)) < 1e-6
    assert max(g.abs().max().item() for g in full_grads) > 1e-4         # a real gradient was compared
    assert math.isclose(full["kl"], parts["kl"], rel_tol=1e-5, abs_tol=1e-7) or beta == 0.0
    with pytest.raises(ValueError):
        grpo_step(model, torch.optim.SGD(params, lr=0.0), rollout, rewards, groups_per_pass=0)


def test_select_groups_keeps_whole_groups():
    _, _, rollout, _ = rollout_and_rewards()
    kept = select_groups(rollout, torch.tensor([False, True]))
    assert kept.completion_ids.shape[0] == 3 and kept.texts == rollout.texts[3:]
    assert (kept.prompt_mask[:, 0] == 1).any() and (kept.completion_mask[:, -1] == 1).any()  # trimmed


@pytest.mark.parametrize("change, error", [
    (dict(rewards=torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 0.0]])), ValueError),
    (dict(rewards=torch.tensor([[1.0, float("inf"), 0.0], [0.0, 1.0, 0.0]])), ValueError),
    (dict(rewards=torch.zeros(3, 2)), ValueError),           # 6 values, but groups of 3
    (dict(rewards=torch.zeros(5)), ValueError),
    (dict(rewards=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), TypeError),
    (dict(beta=-0.1), ValueError), (dict(beta="0.1"), TypeError),
    (dict(clip_eps=-0.2), ValueError), (dict(clip_eps=0.0), ValueError), (dict(clip_eps=1.5), ValueError),
    (dict(updates=0), ValueError), (dict(max_grad_norm=-1.0), ValueError),
])
def test_grpo_step_bad_input(change, error):
    model, _, rollout, rewards = rollout_and_rewards()
    args = dict(rewards=rewards) | change
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(error):
        grpo_step(model, optimizer, rollout, **args)


def test_train_grpo_and_evaluate_run_end_to_end():
    model, tokenizer = adapted_model()
    items = [{"prompt": p, "answer": 4} for p in PROMPTS]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = train_grpo(model, tokenizer, optimizer, items, mentions_integer_reward, steps=2, prompts_per_step=2,
                         group_size=2, max_new_tokens=4, progress=False)
    assert len(history) == 2 and {"reward", "length", "kl", "loss", "example"} <= set(history[0])
    replies, rewards = evaluate(model, tokenizer, items, exact_integer_reward, max_new_tokens=4)
    assert len(replies) == len(rewards) == 2
    assert rewards == [exact_integer_reward(r, 4) for r in replies]
    with pytest.raises(ValueError, match="items"):
        train_grpo(model, tokenizer, optimizer, [{"prompt": "x"}], exact_integer_reward, steps=1, prompts_per_step=1)


# ----------------------------------------------------------------------------------------------
# One step of ours against trl's GRPOTrainer


def test_grpo_step_matches_trl_grpo_trainer(tmp_path):
    """Compared: the loss and the LoRA gradients of one grpo_step (beta 0.04, clip 0.2, temperature 0.8, no
    skipping) versus trl 1.16's GRPOTrainer.compute_loss (loss_type "bnpo", use_bias_correction_kl off,
    same beta/epsilon/temperature) on the same inputs: our rollout (left-padded prompt ids and mask, sampled
    completion ids and mask, old log-probs), our advantages and our reference log-probs (LoRA off). trl
    recomputes the policy's log-probs itself. Also: our LoRA-off reference equals trl's own reference
    model (loaded by trl from the saved base) on the same tokens. Each to 1e-5."""
    import trl  # noqa: F401  (pinned: a missing trl is a failure, not a skip)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    base, tokenizer = tiny_chat_model(0)
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, seed=0,
                      beta=0.04, epsilon=0.2, temperature=0.8, loss_type="bnpo", use_bias_correction_kl=False,
                      num_generations=3, per_device_train_batch_size=6, max_completion_length=6,
                      logging_strategy="no", save_strategy="no")
    trainer = GRPOTrainer(model=str(tmp_path), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
                          processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    add_lora_top(model, 1, ("q_proj", "v_proj"), r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)))
    model.train()
    rollout = sample_groups(model, tokenizer, PROMPTS, 3, 6, temperature=0.8, generator=torch.Generator().manual_seed(3))
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    with torch.no_grad(), lora_disabled(model):
        ref = rollout_logprobs(model, rollout, temperature=0.8)
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    with torch.no_grad():
        trl_ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, input_ids, attention,
                                                                   rollout.completion_ids.shape[1])
    mask = rollout.completion_mask.bool()
    assert (ref - trl_ref)[mask].abs().max() < 1e-5

    from utils.alignment import grpo_advantages

    inputs = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
              "completion_ids": rollout.completion_ids, "completion_mask": rollout.completion_mask,
              "advantages": grpo_advantages(rewards).reshape(-1), "old_per_token_logps": rollout.old_logprobs,
              "ref_per_token_logps": ref, "num_items_in_batch": rollout.completion_mask.sum()}
    params = [p for p in model.parameters() if p.requires_grad]
    trl_loss = trainer.compute_loss(model, inputs)
    trl_grads = torch.autograd.grad(trl_loss, params)
    ours = grpo_step(model, torch.optim.SGD(params, lr=0.0), rollout, rewards, beta=0.04, clip_eps=0.2,
                     temperature=0.8, max_grad_norm=1e9)
    assert abs(ours["loss"] - trl_loss.item()) < 1e-5 and ours["kl"] > 1e-3    # policy != reference
    assert max((p.grad - g).abs().max().item() for p, g in zip(params, trl_grads)) < 1e-5
