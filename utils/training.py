"""Pretraining a small GPT on next-token prediction (lesson 05).

The pieces, in the order a training run uses them:

* `split_by_work(works, val_works)`: train/validation text split by whole works, so that the
  validation text is genuinely unseen (no neighbouring lines of the same scene in both halves).
* `CharTokenizer`: one token per character, the simplest tokenizer (lesson 01 has BPE).
* `get_batch(data, batch_size, block_size, generator)`: random windows of a 1-D token tensor;
  the targets are the inputs shifted by one position (next-token prediction).
* `next_token_loss(model, x, y)`: mean cross-entropy of the predicted next tokens (in nats).
* `estimate_loss(model, data, ...)`: the mean loss over a fixed sample of windows;
  `perplexity(loss) = exp(loss)`.
* `lr_at(step, config)`: linear warm-up, then cosine decay to `min_lr`.
* `train(model, train_data, val_data, config, ...)`: AdamW, gradient clipping, evaluation every
  `eval_interval` steps, a tqdm progress bar, and a `History` of the losses to plot.
* `save_checkpoint` / `load_checkpoint`: model, optimizer, step, RNG states and history as
  safetensors + JSON (no pickle). Resuming from a checkpoint replays EXACTLY the loss curve of an
  uninterrupted run (tests/test_training.py checks it bit for bit).
* `pretrained_tiny_gpt()`: lesson 05's character-level Shakespeare model, from the course cache
  or, if it is not there yet, trained with the same seed and configuration (later lessons use it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Data: split, tokenise, batch
# --------------------------------------------------------------------------------------------

# Three plays (a tragedy, a comedy, a history) held out for validation: ~9% of the characters.
VAL_WORKS = ("hamlet", "twelfth_night", "henry_v")


def split_by_work(works: dict[str, str], val_works=VAL_WORKS) -> tuple[str, str]:
    """(train_text, val_text): the works named in val_works go to validation, the rest to training.

    Works are joined with blank lines, in sorted name order, so the split is reproducible.
    """
    if not isinstance(works, dict) or not works:
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
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
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
    training examples at once, each with a different amount of context.
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError("data must be a 1-D tensor of token ids")
    for name, value in (("batch_size", batch_size), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
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
    """Mean cross-entropy (nats per token) of the model's next-token predictions."""
    logits = model(x)  # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model, data: torch.Tensor, batch_size: int, block_size: int, eval_iters: int = 20,
                  seed: int = 1234) -> float:
    """Mean next-token loss over `eval_iters` random windows, drawn with their own seeded generator.

    The same seed gives the same windows on every call, so the numbers of an evaluation curve
    differ only because the model changed, and evaluating never disturbs the training RNG.
    """
    if not isinstance(eval_iters, int) or eval_iters < 1:
        raise ValueError(f"eval_iters must be a positive int, got {eval_iters!r}")
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


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats): the model is as unsure as a uniform choice among this many tokens."""
    if not math.isfinite(loss) or loss < 0:
        raise ValueError(f"loss must be a finite, non-negative cross-entropy in nats, got {loss}")
    return math.exp(loss)


def bits_per_character(loss_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Convert a loss in nats per token into bits per character: comparable across tokenizers."""
    if n_tokens < 1 or n_chars < 1:
        raise ValueError("n_tokens and n_chars must be positive")
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
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"warmup_steps must be an int in [0, max_steps), got {self.warmup_steps!r}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at `step`: linear warm-up to config.lr, then a cosine down to config.min_lr.

    Warm-up: Adam's first updates use poor estimates of the gradient's scale, so big steps then
    can throw the randomly initialised model somewhere bad. Cosine decay: small steps at the end
    let the loss settle into the bottom of the valley instead of bouncing around it.
    """
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
# Checkpoints: safetensors + JSON, no pickle
# --------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1


def _flatten_optimizer(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() as (tensors for safetensors, everything else for JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON turned the tuple into a list
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(directory, model, optimizer, step: int, history: History, config: TrainConfig,
                    data_generator: torch.Generator) -> Path:
    """Write a checkpoint folder: model.safetensors, trainer.safetensors, trainer.json.

    trainer.safetensors holds the optimizer's tensors (AdamW's step counts and moment estimates,
    flattened to names like "optimizer.3.exp_avg") and the RNG states; trainer.json holds the
    step, the configuration, the optimizer's hyper-parameters and the history. The folder is
    written under a temporary name and renamed at the end, so an interrupted save never leaves a
    half-written checkpoint behind.
    """
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding/output matrix
    tensors, optimizer_meta = _flatten_optimizer(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = data_generator.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "trainer.safetensors"))
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "config": asdict(config),
            "optimizer": optimizer_meta, "history": history.to_dict()}
    (tmp / "trainer.json").write_text(json.dumps(meta), encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_checkpoint(directory, model, optimizer=None, data_generator: torch.Generator | None = None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint folder into model (and optimizer, RNG states); returns trainer.json's dict
    with "history" as a History object."""
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    for name in ("model.safetensors", "trainer.safetensors", "trainer.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a complete checkpoint: {name} is missing")
    meta = json.loads((directory / "trainer.json").read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown checkpoint format {meta.get('format')!r} (this code reads {CHECKPOINT_FORMAT})")
    device = next(model.parameters()).device
    load_model(model, str(directory / "model.safetensors"), device=str(device))
    tensors = load_file(str(directory / "trainer.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        if data_generator is not None:
            data_generator.set_state(tensors["rng.data"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    meta["history"] = History.from_dict(meta["history"])
    return meta


def latest_checkpoint(checkpoint_dir) -> Path | None:
    """The complete checkpoint (step_NNNNNN folder) with the highest step, or None."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "trainer.json").is_file())
    return done[-1] if done else None


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
    from tqdm.auto import tqdm

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if checkpoint_interval is not None and (checkpoint_dir is None or checkpoint_interval < 1):
        raise ValueError("checkpoint_interval needs a checkpoint_dir and must be a positive int")
    if not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be a positive int, got {keep_checkpoints!r}")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be None or a positive int, got {stop_after!r}")
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
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps,
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
            complete = sorted(p for p in Path(checkpoint_dir).glob("step_*") if not p.name.endswith(".tmp"))
            for old in complete[:-keep_checkpoints]:
                shutil.rmtree(old)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    model.eval()
    return history


# --------------------------------------------------------------------------------------------
# Lesson 05's model, for later lessons
# --------------------------------------------------------------------------------------------

TINY_GPT_SEED = 0
NANOGPT_CPU_CONFIG = TrainConfig()  # nanoGPT's CPU configuration: 2000 steps, batch 12, context 64, lr 1e-3
# Lesson 05's model: the same compute with one change, a 3x higher peak learning rate (lesson 05
# trains both and compares their validation loss).
TINY_TRAIN_CONFIG = TrainConfig(lr=3e-3, min_lr=3e-4)
TINY_MODEL_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
TINY_GPT_NAME = "tiny-shakespeare-char-gpt-v1"


def shakespeare_char_data(val_works=VAL_WORKS):
    """(tokenizer, train_ids, val_ids): the character-level Shakespeare data of lesson 05.

    The character set is that of the whole corpus (84 characters): knowing which characters
    exist is not knowing the validation text, and it keeps every validation character encodable.
    """
    from utils.data import shakespeare

    works = shakespeare()
    train_text, val_text = split_by_work(works, val_works)
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    return tokenizer, train_ids, val_ids


def build_tiny_gpt(vocab_size: int, block_size: int = TINY_TRAIN_CONFIG.block_size, seed: int = TINY_GPT_SEED,
                   **shape):
    """A freshly initialised GPT of lesson 05's shape (seeded, so every learner starts equal)."""
    from utils.gpt import GPT, GPTConfig

    shape = {**TINY_MODEL_SHAPE, **shape}
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, **shape))


def save_pretrained(directory, model, tokenizer: CharTokenizer, info: dict | None = None) -> Path:
    """model.safetensors + config.json (model shape, characters, and whatever `info` says)."""
    from safetensors.torch import save_model

    from utils.models import sha256_of

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    config = {"gpt_config": asdict(model.config), "chars": "".join(tokenizer.chars), "info": info or {},
              "sha256": sha256_of(directory / "model.safetensors")}  # checked by load_pretrained
    # config.json is written last: a folder without it is an unfinished save
    (directory / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return directory


def load_pretrained(directory):
    """(model, tokenizer, info) saved by save_pretrained; the model is in eval mode."""
    from safetensors.torch import load_model

    from utils.gpt import GPT, GPTConfig
    from utils.models import ModelIntegrityError, sha256_of

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    weights = directory / "model.safetensors"
    if "sha256" not in config or sha256_of(weights) != config["sha256"]:
        raise ModelIntegrityError(f"{weights} does not match the sha256 recorded in config.json when it was "
                                  f"saved (changed or partly written); delete {directory} and save it again")
    known = {f.name for f in fields(GPTConfig)}  # tolerate fields added to or dropped from GPTConfig later
    model = GPT(GPTConfig(**{k: v for k, v in config["gpt_config"].items() if k in known}))
    load_model(model, str(directory / "model.safetensors"))
    return model.eval(), CharTokenizer(config["chars"]), config["info"]


def tiny_gpt_dir() -> Path:
    from utils.models import cache_dir

    return cache_dir() / TINY_GPT_NAME


def pretrained_tiny_gpt(progress: bool = True):
    """(model, tokenizer): lesson 05's character-level GPT trained on Shakespeare.

    Loaded from the course cache if lesson 05 (or an earlier call) saved it there; otherwise
    trained now with lesson 05's seed and configuration (about 2 minutes on 2 CPU cores) and
    saved, so that a later lesson works even when it is run before lesson 05.
    """
    from utils.models import ModelIntegrityError

    folder = tiny_gpt_dir()
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        try:
            model, tokenizer, _ = load_pretrained(folder)
            return model, tokenizer
        except ModelIntegrityError:
            pass  # a damaged or unfinished save: train again and overwrite it
    model, tokenizer, history = train_tiny_gpt(progress=progress)
    save_pretrained(folder, model, tokenizer, tiny_gpt_info(history))
    return model, tokenizer


def train_tiny_gpt(progress: bool = True):
    """Lesson 05's run: (model, tokenizer, history)."""
    tokenizer, train_ids, val_ids = shakespeare_char_data()
    model = build_tiny_gpt(tokenizer.vocab_size)
    history = train(model, train_ids, val_ids, TINY_TRAIN_CONFIG, progress=progress)
    return model, tokenizer, history


def tiny_gpt_info(history: History) -> dict:
    return {"train_config": asdict(TINY_TRAIN_CONFIG), "seed": TINY_GPT_SEED,
            "val_works": list(VAL_WORKS), "final_val_loss": history.val_loss[-1],
            "final_train_loss": history.train_loss[-1]}
