"""Pretraining a small GPT on next-token prediction (lesson 05).

The pieces, in the order a training run uses them:

* `split_by_work(works, val_works)`: train/validation text split by whole works, so that the
  validation text is genuinely unseen (no neighbouring lines of the same scene in both halves).
* `CharTokenizer`: one token per character, the simplest tokenizer (lesson 01 has BPE).
* `get_batch(data, batch_size, block_size, generator)`: random windows of a 1-D token tensor;
  the targets are the inputs shifted by one position (next-token prediction).
* `next_token_loss(model, x, y)`: mean cross-entropy of the predicted next tokens (in nats).
* `estimate_loss(model, data, ...)`: the mean loss over a fixed sample of windows;
  `perplexity_from_loss(loss) = exp(loss)`.
* `lr_at(step, config)`: linear warm-up, then cosine decay to `min_lr`.
* `train(model, train_data, val_data, config, ...)`: AdamW, gradient clipping, evaluation every
  `eval_interval` steps, a progress bar (tqdm; a plain summary line once done), and a `History`
  of the losses to plot.
* `save_checkpoint` / `load_checkpoint` (from `utils.checkpoints`): model, optimizer, step, RNG
  states and history as safetensors + JSON (no pickle). Resuming from a checkpoint replays EXACTLY
  the loss curve of an uninterrupted run (tests/test_training.py checks it bit for bit).

Lesson 05's trained model, kept for later lessons, is in `utils.tiny_gpt`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.checkpoints import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from utils.checks import check_int, check_number, check_positive_int, check_text
from utils.notebook_outputs import ProgressBar

# --------------------------------------------------------------------------------------------
# Data: split, tokenise, batch
# --------------------------------------------------------------------------------------------

# Three plays (a tragedy, a comedy, a history) held out for validation: ~9% of the characters.
VAL_WORKS = ("hamlet", "twelfth_night", "henry_v")


def split_by_work(works: dict[str, str], val_works=VAL_WORKS) -> tuple[str, str]:
    """(train_text, val_text): the works named in val_works go to validation, the rest to training.

    Works are joined with blank lines, in sorted name order, so the split is reproducible.
    Example: ({"a": "A text", "b": "B text", "c": "C text"}, ["b"]) -> ("A text\n\nC text", "B text").
    """
    if not isinstance(works, dict):
        raise TypeError(f"works must be a dict {{work name: text}}, got {type(works).__name__}")
    if not works:
        raise ValueError("works must be a non-empty dict {work name: text}")
    val_works = tuple(val_works)
    unknown = sorted(set(val_works) - set(works))
    if unknown:
        raise ValueError(f"unknown validation works {unknown}; choose from {sorted(works)}")
    if not val_works or len(set(val_works)) == len(works):
        raise ValueError("val_works must name at least one work and leave at least one for training")
    train = "\n\n".join(works[name] for name in sorted(works) if name not in val_works)
    val = "\n\n".join(works[name] for name in sorted(works) if name in val_works)
    return train, val


class CharTokenizer:
    """One token per character: the vocabulary is the sorted set of characters of a text."""

    def __init__(self, chars):
        chars = list(chars)
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("chars must be a non-empty sequence of distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The characters of `text`, sorted. Example: from_text("hello").chars -> ["e", "h", "l", "o"]."""
        check_text("text", text)
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary of "
                             f"{self.vocab_size} characters") from None

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        return "".join(self.chars[i] for i in ids)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"type": "char", "chars": "".join(self.chars)}), encoding="utf-8")

    @classmethod
    def load(cls, path) -> CharTokenizer:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("type") != "char":
            raise ValueError(f"{path} is not a CharTokenizer file")
        return cls(data["chars"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator=None, device=None):
    """Random windows of a 1-D token tensor: x (B, T) and the next tokens y (B, T).

    y[b, t] = data[i_b + t + 1] is the token that follows x[b, :t + 1], so one window gives T
    training examples at once, each with a different amount of context. Shown in lesson 05.
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError("data must be a 1-D tensor of token ids")
    check_positive_int("batch_size", batch_size)
    check_positive_int("block_size", block_size)
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    index = starts[:, None] + torch.arange(block_size + 1)  # (B, T + 1)
    chunk = data[index].long()  # (B, T + 1)
    x, y = chunk[:, :-1], chunk[:, 1:]
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


# --------------------------------------------------------------------------------------------
# Loss, evaluation, perplexity
# --------------------------------------------------------------------------------------------

def next_token_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of the model's next-token predictions. Shown in lesson 05."""
    logits = model(x)  # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model, data: torch.Tensor, batch_size: int, block_size: int, eval_iters: int = 20,
                  seed: int = 1234) -> float:
    """Mean next-token loss over `eval_iters` random windows, drawn with their own seeded generator.

    The same seed gives the same windows on every call, so the numbers of an evaluation curve
    differ only because the model changed, and evaluating never disturbs the training RNG.
    """
    check_positive_int("eval_iters", eval_iters)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(eval_iters):
        x, y = get_batch(data, batch_size, block_size, generator, device)
        total += next_token_loss(model, x, y).item()
    model.train(was_training)
    return total / eval_iters


@torch.no_grad()
def loss_by_position(model, data: torch.Tensor, batch_size: int, block_size: int, eval_iters: int = 20,
                     seed: int = 1234) -> torch.Tensor:
    """Mean loss at each position of the window, (block_size,): position t predicts its token
    from t + 1 tokens of context, so this curve shows what more context is worth."""
    check_positive_int("eval_iters", eval_iters)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(block_size)
    for _ in range(eval_iters):
        x, y = get_batch(data, batch_size, block_size, generator, device)
        logits = model(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
        total += loss.mean(0).cpu()
    model.train(was_training)
    return total / eval_iters


def perplexity_from_loss(loss: float) -> float:
    """exp(mean cross-entropy in nats): the model is as unsure as a uniform choice among this many tokens.

    Example: perplexity_from_loss(math.log(65)) -> 65.0 (a uniform guess over 65 characters).
    Shown in lesson 05.
    """
    if not math.isfinite(loss) or loss < 0:
        raise ValueError(f"loss must be a finite, non-negative cross-entropy in nats, got {loss}")
    return math.exp(loss)


def bits_per_character(loss_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Convert a loss in nats per token into bits per character: comparable across tokenizers.

    Example: 1 nat per token, 2 tokens per 5 characters -> 0.4 nats = 0.577 bits per character.
    """
    check_number("loss_per_token", loss_per_token, low=0)
    check_positive_int("n_tokens", n_tokens)
    check_positive_int("n_chars", n_chars)
    return loss_per_token * n_tokens / n_chars / math.log(2)


# --------------------------------------------------------------------------------------------
# Configuration and learning-rate schedule
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Hyper-parameters of a run. The defaults are nanoGPT's Shakespeare-char CPU configuration."""

    max_steps: int = 2000
    batch_size: int = 12
    block_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4           # the cosine decays to this (nanoGPT: lr / 10)
    warmup_steps: int = 100
    weight_decay: float = 0.1      # on matrices only, not on biases/LayerNorm gains
    beta1: float = 0.9
    beta2: float = 0.99            # nanoGPT uses 0.99 for its small Shakespeare models
    grad_clip: float = 1.0         # clip the global gradient norm; 0 turns clipping off
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 0                  # seeds the batch sampler (the model's init is seeded by the caller)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "block_size", "eval_interval", "eval_iters"):
            check_positive_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, low=0, high=self.max_steps - 1,
                  what=" (below max_steps)")
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("min_lr", self.min_lr, low=0, high=self.lr, low_open=True)  # the cosine ends here
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("grad_clip", self.grad_clip, low=0)
        check_number("beta1", self.beta1, low=0, high=1, high_open=True)
        check_number("beta2", self.beta2, low=0, high=1, high_open=True)
        check_int("seed", self.seed, low=0)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


NANOGPT_CPU_CONFIG = TrainConfig()  # nanoGPT's CPU configuration: 2000 steps, batch 12, context 64, lr 1e-3


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at `step`: linear warm-up to config.lr, then a cosine down to config.min_lr.

    Warm-up: Adam's first updates use poor estimates of the gradient's scale, so big steps then
    can throw the randomly initialised model somewhere bad. Cosine decay: small steps at the end
    let the loss settle into the bottom of the valley instead of bouncing around it.
    Shown in lesson 05.
    """
    check_int("step", step, low=0)  # a negative step would give a negative learning rate
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)  # 0 -> 1
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - config.min_lr)


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices (and embeddings) but not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


# --------------------------------------------------------------------------------------------
# History of a run
# --------------------------------------------------------------------------------------------

@dataclass
class History:
    """Everything a loss plot needs: the loss of every step and the evaluations."""

    step: list[int] = field(default_factory=list)          # 1-based: loss[i] is the loss of step step[i]
    loss: list[float] = field(default_factory=list)        # training loss of that step's batch
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)     # steps completed when evaluated (0 = init)
    train_loss: list[float] = field(default_factory=list)  # estimate_loss on training windows
    val_loss: list[float] = field(default_factory=list)    # estimate_loss on validation windows
    train_seconds: float = 0.0                             # time in training steps (not in evals)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    @property
    def steps_per_second(self) -> float:
        return len(self.step) / self.train_seconds if self.train_seconds else float("nan")


def plot_history(history: History, ax=None, title: str | None = None):
    """Training loss of every step (faint), and the train/validation estimates (markers)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.step, history.loss, color="tab:blue", alpha=0.25, lw=0.8, label="batch loss")
    ax.plot(history.eval_step, history.train_loss, "o-", color="tab:blue", label="train (estimate)")
    ax.plot(history.eval_step, history.val_loss, "s-", color="tab:orange", label="validation (unseen works)")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(title or "next-token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def train(model, train_data: torch.Tensor, val_data: torch.Tensor, config: TrainConfig, *,
          checkpoint_dir=None, checkpoint_interval: int | None = None, keep_checkpoints: int = 2,
          resume: bool = False, stop_after: int | None = None, on_eval=None, on_step=None,
          progress: bool = True) -> History:
    """Train `model` on next-token prediction; returns the History of the run.

    Every step: draw a batch, forward, loss, backward, clip the gradient norm, set the scheduled
    learning rate, AdamW update. Every `eval_interval` steps (and before the first and after the
    last): estimate the train and validation loss, then call on_eval(step, model, history).
    on_step(step, loss) runs after every step (an exception there interrupts training, as a
    crash or Ctrl-C would).

    With checkpoint_dir and checkpoint_interval, a checkpoint is saved every checkpoint_interval
    steps (the latest `keep_checkpoints` are kept). With resume=True, training continues from the
    latest checkpoint in checkpoint_dir, and the history it returns is the same, bit for bit, as
    that of a run that was never interrupted (if the model, data and config are the same).
    stop_after=n stops after step n as if the run were interrupted there (the learning-rate
    schedule still follows config.max_steps), e.g. to compare runs at equal steps.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if checkpoint_interval is not None:
        check_positive_int("checkpoint_interval", checkpoint_interval)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_interval needs a checkpoint_dir to write the checkpoints to")
    check_positive_int("keep_checkpoints", keep_checkpoints)
    if stop_after is not None:
        check_positive_int("stop_after", stop_after, what=" or None")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir to resume from")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and config.block_size > block_size:
        raise ValueError(f"config.block_size={config.block_size} exceeds the model's context of {block_size}")

    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config)
    data_generator = torch.Generator().manual_seed(config.seed)  # batches: independent of other RNG use
    history, start = History(), 0
    if resume:
        last = latest_checkpoint(checkpoint_dir)
        if last is not None:
            meta = load_checkpoint(last, model, optimizer, data_generator)
            if meta["config"] != asdict(config):
                raise ValueError(f"the checkpoint in {last} was trained with a different config "
                                 f"{meta['config']}; resuming with another one would not continue that run")
            history, start = meta["history"], meta["step"]

    def evaluate(step):
        history.eval_step.append(step)
        for data, record in ((train_data, history.train_loss), (val_data, history.val_loss)):
            record.append(estimate_loss(model, data, config.batch_size, config.block_size,
                                        config.eval_iters, seed=config.seed + 1))
        if on_eval is not None:
            on_eval(step, model, history)
        model.train()  # estimate_loss and callbacks may leave it in eval mode

    model.train()
    if start == 0:
        evaluate(0)
    end = config.max_steps if stop_after is None else max(start, min(stop_after, config.max_steps))
    bar = ProgressBar(range(start, end), initial=start, total=config.max_steps,  # "500/2000 ... stopped early"
                      disable=not progress, desc="training", mininterval=1.0)
    for step in bar:
        tic = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, config.batch_size, config.block_size, data_generator, device)
        loss = next_token_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        history.train_seconds += time.perf_counter() - tic
        done = step + 1
        history.step.append(done)
        history.loss.append(loss_value)
        history.lr.append(lr)
        if on_step is not None:
            on_step(done, loss_value)
        if done % config.eval_interval == 0 or done == config.max_steps:
            evaluate(done)
            bar.set_postfix(train=f"{history.train_loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}")
        if checkpoint_interval is not None and done % checkpoint_interval == 0:
            save_checkpoint(Path(checkpoint_dir) / f"step_{done:06d}", model, optimizer, done,
                            history, config, data_generator)
            for old in complete_checkpoints(checkpoint_dir)[:-keep_checkpoints]:  # by step number
                shutil.rmtree(old)
    bar.close()
    model.eval()
    return history
