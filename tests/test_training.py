"""utils.training: batches, schedule, loss/perplexity, checkpoints, and exact resume.

The training runs here are tiny (a 2-layer, 32-wide GPT on a few lines of Hamlet, 10-60 steps): well under a
second each on 2 CPU cores, so none is marked slow.
"""

from __future__ import annotations

import math

import pytest
import torch

from utils.gpt import GPT, GPTConfig
from utils.training import (
    CharTokenizer,
    TrainConfig,
    bits_per_character,
    estimate_loss,
    get_batch,
    latest_checkpoint,
    lr_at,
    perplexity_from_loss,
    split_by_work,
    train,
)

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 8


def tiny_model(vocab_size, seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32,
                         dropout=dropout, bias=False))


@pytest.fixture(scope="module")
def data():
    tok = CharTokenizer.from_text(TEXT)
    ids = torch.tensor(tok.encode(TEXT))
    cut = int(0.8 * len(ids))
    return tok, ids[:cut], ids[cut:]


def small_config(**overrides):
    base = dict(max_steps=30, batch_size=4, block_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                eval_interval=10, eval_iters=2, seed=3)
    return TrainConfig(**{**base, **overrides})


def test_split_by_work_keeps_validation_works_out_of_training():
    works = {"a": "alpha text", "b": "beta text", "c": "gamma text"}
    train_text, val_text = split_by_work(works, ["b"])
    assert "beta" in val_text and "beta" not in train_text
    assert "alpha" in train_text and "gamma" in train_text
    with pytest.raises(ValueError, match="unknown validation works"):
        split_by_work(works, ["zeta"])
    with pytest.raises(ValueError, match="at least one"):
        split_by_work(works, ["a", "b", "c"])
    with pytest.raises(TypeError, match="dict"):
        split_by_work([("a", "alpha text")], ["a"])


def test_char_tokenizer_round_trip_and_unknown_character(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("Z€")
    with pytest.raises(ValueError):
        CharTokenizer.from_text("")
    with pytest.raises(TypeError):
        CharTokenizer.from_text(b"bytes")
    tok.save(tmp_path / "chars.json")
    assert CharTokenizer.load(tmp_path / "chars.json").chars == tok.chars


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(100)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, batch_size=5, block_size=8, generator=g)
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(y.max()) <= 99
    with pytest.raises(ValueError, match="fewer than block_size"):
        get_batch(torch.arange(5), 2, 8)
    with pytest.raises(ValueError, match="batch_size"):
        get_batch(data, 0, 8)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(max_steps=1000, warmup_steps=100, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(1000, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the cosine part never increases"
    assert lr_at(550, cfg) == pytest.approx(5.5e-4)  # half-way: the mean of lr and min_lr


def test_bad_configs_raise_value_errors():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(max_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        TrainConfig(batch_size=12.0)
    with pytest.raises(ValueError, match="beta2"):
        TrainConfig(beta2=1.0)


@pytest.mark.parametrize("field, value, error", [
    ("lr", math.inf, ValueError), ("lr", math.nan, ValueError), ("min_lr", math.nan, ValueError),
    ("grad_clip", math.nan, ValueError), ("grad_clip", math.inf, ValueError), ("grad_clip", -1.0, ValueError),
    ("weight_decay", math.inf, ValueError), ("lr", "1e-3", TypeError), ("seed", -1, ValueError),
])
def test_non_finite_and_out_of_range_hyper_parameters_are_refused(field, value, error):
    with pytest.raises(error, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("step, error", [(-5, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_lr_at_refuses_a_step_it_has_no_rate_for(step, error):
    with pytest.raises(error, match="step"):
        lr_at(step, TrainConfig())


def test_perplexity_of_a_uniform_guess_is_the_vocabulary_size():
    assert perplexity_from_loss(math.log(65)) == pytest.approx(65)
    with pytest.raises(ValueError):
        perplexity_from_loss(-1.0)
    # 2 tokens per 5 characters at 1 nat per token = 0.4 nats = 0.577 bits per character
    assert bits_per_character(1.0, 2, 5) == pytest.approx(0.4 / math.log(2))
    with pytest.raises(ValueError, match="n_chars"):
        bits_per_character(1.0, 2, 0)


def test_untrained_model_loss_is_near_log_vocab_and_estimate_is_repeatable(data):
    tok, train_ids, _ = data
    model = tiny_model(tok.vocab_size, dropout=0.0)
    state = torch.get_rng_state()
    a = estimate_loss(model, train_ids, 4, 16, eval_iters=3)
    assert torch.equal(state, torch.get_rng_state()), "evaluation must not consume the global RNG"
    assert a == estimate_loss(model, train_ids, 4, 16, eval_iters=3)
    assert abs(a - math.log(tok.vocab_size)) < 0.3  # small random init: nearly uniform predictions


def test_training_lowers_the_loss(data):
    tok, train_ids, val_ids = data
    model = tiny_model(tok.vocab_size)
    history = train(model, train_ids, val_ids, small_config(max_steps=60), progress=False)
    assert len(history.loss) == 60 and history.eval_step == [0, 10, 20, 30, 40, 50, 60]
    assert history.train_loss[-1] < history.train_loss[0] - 0.5


class Crash(Exception):
    pass


def test_resume_after_interruption_gives_exactly_the_same_loss_curve(data, tmp_path):
    tok, train_ids, val_ids = data
    cfg = small_config()
    # 1. the reference: one uninterrupted run (dropout 0.1, so the torch RNG state matters too)
    reference = train(tiny_model(tok.vocab_size), train_ids, val_ids, cfg, progress=False)

    # 2. the same run, checkpointing every 10 steps, "crashes" after step 25
    def crash_at_25(step, loss):
        if step == 25:
            raise Crash
    with pytest.raises(Crash):
        train(tiny_model(tok.vocab_size), train_ids, val_ids, cfg, checkpoint_dir=tmp_path,
              checkpoint_interval=10, on_step=crash_at_25, progress=False)
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == "step_000020"
    assert sorted(p.name for p in last.iterdir()) == ["model.safetensors", "trainer.json", "trainer.safetensors"]

    # 3. a new process would start from a differently initialised model and a disturbed RNG
    torch.manual_seed(999)
    _ = torch.rand(7)
    resumed = train(tiny_model(tok.vocab_size, seed=123), train_ids, val_ids, cfg,
                    checkpoint_dir=tmp_path, checkpoint_interval=10, resume=True, progress=False)
    assert resumed.step == reference.step
    assert resumed.loss == reference.loss, "resumed losses must be bitwise equal"
    assert resumed.val_loss == reference.val_loss and resumed.train_loss == reference.train_loss
    assert resumed.lr == reference.lr


def test_resume_with_a_different_config_is_refused(data, tmp_path):
    tok, train_ids, val_ids = data
    train(tiny_model(tok.vocab_size), train_ids, val_ids, small_config(max_steps=10), progress=False,
          checkpoint_dir=tmp_path, checkpoint_interval=10)
    with pytest.raises(ValueError, match="different config"):
        train(tiny_model(tok.vocab_size), train_ids, val_ids, small_config(max_steps=10, lr=1e-2),
              checkpoint_dir=tmp_path, resume=True, progress=False)


def test_stop_after_is_the_start_of_the_full_run(data):
    """stop_after=n: exactly n steps, the same as the first n of the full run (same schedule, same losses)."""
    tok, train_ids, val_ids = data
    cfg = small_config()
    full = train(tiny_model(tok.vocab_size), train_ids, val_ids, cfg, progress=False)
    part = train(tiny_model(tok.vocab_size), train_ids, val_ids, cfg, stop_after=12, progress=False)
    assert part.step == list(range(1, 13))
    assert part.loss == full.loss[:12] and part.lr == full.lr[:12]  # the learning rate of a max_steps run
    assert part.eval_step == [s for s in full.eval_step if s <= 12]
    with pytest.raises(ValueError):
        train(tiny_model(tok.vocab_size), train_ids, val_ids, cfg, stop_after=0, progress=False)
