"""utils.reward_model: the scalar head on the last real token, Bradley-Terry training, adapter swapping
(one base model: policy, reward model and reference), and lesson 13's course-written data. On the tiny
stand-in model (tests/standin.py); nothing here loads SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests import make_13_data
from tests.standin import tiny_chat_model
from utils.answers import mentions_any
from utils.data import data_path, load_jsonl
from utils.lora import add_lora
from utils.reward_model import (
    RewardModel,
    adapter_state,
    last_token_index,
    load_adapter_state,
    lora_disabled,
    pairwise_correct,
    train_reward_model,
    train_top_layers_only,
    use_adapter,
)

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def reward_model(seed=0):
    model, tokenizer = tiny_chat_model(seed=seed)
    add_lora(model, TARGETS, r=4, alpha=8)
    return RewardModel(model, tokenizer)


def test_last_token_index():
    assert last_token_index(torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]])).tolist() == [1, 2, 0]


def test_a_reply_scores_the_same_alone_and_in_a_padded_batch():
    rm = reward_model()
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    questions, replies = ["Capital of France?", "2+2?"], ["Paris.", "It is four, as everyone knows."]
    together = rm.score(questions, replies)
    alone = torch.cat([rm.score(questions[:1], replies[:1]), rm.score(questions[1:], replies[1:])])
    assert together.shape == (2,) and torch.allclose(together, alone, atol=1e-5)
    assert rm.batch(questions, replies)["attention_mask"].sum(1).tolist()[0] < rm.batch(
        questions, replies)["attention_mask"].shape[1]   # the short one really was padded


def test_an_untrained_head_scores_zero_and_the_loss_is_log2():
    rm = reward_model()
    assert torch.equal(rm.score(["q?"], ["a"]), torch.zeros(1))
    history = train_reward_model(rm, [{"prompt": "q?", "chosen": "a", "rejected": "b"}], lr=1e-9)
    assert math.isclose(history[0]["loss"], math.log(2), rel_tol=1e-6)


def test_training_learns_a_simple_preference():
    """Chosen replies say 'yes', rejected ones 'no': a few epochs rank all held-out pairs right."""
    torch.manual_seed(0)
    rm = reward_model()
    topics = ["the sky", "a cat", "the sea", "bread", "a song", "the moon", "a tree", "rain", "salt", "a bell"]
    pairs = [{"prompt": f"Do you like {t}?", "chosen": "yes", "rejected": "no"} for t in topics]
    history = train_reward_model(rm, pairs[:8], epochs=6, batch_size=4, lr=1e-2)
    assert len(history) == 12 and history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert all(pairwise_correct(rm, pairs[8:]))


def test_adapter_state_swaps_and_restores():
    rm = reward_model()
    model = rm.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.tensor([[5, 6, 7]])
    own = adapter_state(model)
    other = {k: torch.zeros_like(v) for k, v in own.items()}   # B = 0: the adapter changes nothing
    with torch.no_grad():
        mine = model(input_ids=ids).logits
        with use_adapter(model, other):
            swapped = model(input_ids=ids).logits
        with lora_disabled(model):
            reference = model(input_ids=ids).logits
        back = model(input_ids=ids).logits
    assert torch.allclose(swapped, reference, atol=1e-6) and not torch.allclose(mine, swapped)
    assert torch.equal(mine, back)
    own["model.layers.0.self_attn.q_proj.lora_A"] += 1           # a copy: changing it changes nothing
    assert not torch.equal(own["model.layers.0.self_attn.q_proj.lora_A"],
                           adapter_state(model)["model.layers.0.self_attn.q_proj.lora_A"])
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(model, {"x": torch.zeros(1)})


def test_train_top_layers_only():
    rm = reward_model()
    n = train_top_layers_only(rm.model, 1)
    trainable = [name for name, p in rm.model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("model.layers.1.") for name in trainable)
    assert n == sum(p.numel() for p in rm.model.parameters() if p.requires_grad)
    with pytest.raises(ValueError):
        train_top_layers_only(rm.model, 3)   # the stand-in has 2 blocks
    model, _ = tiny_chat_model()
    with pytest.raises(ValueError, match="no LoRA"):
        train_top_layers_only(model, 1)


def test_bad_input():
    rm = reward_model()
    with pytest.raises(ValueError, match="one reply per question"):
        rm.score(["a?", "b?"], ["x"])
    with pytest.raises(TypeError):
        rm.score("a?", ["x"])
    with pytest.raises(ValueError, match="non-empty list"):
        train_reward_model(rm, [])
    with pytest.raises(ValueError, match="lr"):
        train_reward_model(rm, [{"prompt": "q", "chosen": "a", "rejected": "b"}], lr=-1.0)
    assert rm.score(["q?"], [""]).shape == (1,)   # an empty reply is a reply (a policy may give one)


# ----------------------------------------------------------------------------------------------
# Lesson 13's data: course-written, rebuilt by tests/make_13_data.py, checkable by a program


def house_style(reply: str, aliases) -> bool:
    """The property the data teaches: one finished sentence of at most 10 words with the right answer in it."""
    return reply.endswith(".") and len(reply.split()) <= make_13_data.MAX_WORDS and mentions_any(reply, aliases)


def test_the_builder_reproduces_the_committed_files():
    facts = make_13_data.facts()
    for name, rows in (("13_facts.jsonl", facts), ("13_preference_pairs.jsonl", make_13_data.preference_pairs(facts))):
        committed = data_path(name).read_text(encoding="utf-8")
        assert committed == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), name


def test_every_chosen_reply_has_the_house_style_and_no_rejected_one_does():
    facts = {f["id"]: f for f in load_jsonl("13_facts.jsonl")}
    pairs = load_jsonl("13_preference_pairs.jsonl")
    assert len([p for p in pairs if p["split"] == "train"]) >= 150
    assert {f["id"] for f in facts.values() if f["split"] == "heldout"}.isdisjoint(
        {p["fact"] for p in pairs if p["split"] == "train"})
    for p in pairs:
        aliases = facts[p["fact"]]["aliases"]
        assert house_style(p["chosen"], aliases), p["id"]
        assert not house_style(p["rejected"], aliases), p["id"]
        if p["kind"] == "long":      # the same answer, drowned in filler
            assert mentions_any(p["rejected"], aliases) and len(p["rejected"].split()) > 10
        else:                        # short, but wrong
            assert not mentions_any(p["rejected"], aliases) and len(p["rejected"].split()) <= 10
