"""A reward model from a small LLM: LoRA + a scalar head on the last token, trained on preference pairs
(lesson 13).

RLHF's step 2 (Ouyang et al., 2022): people compare two responses to a prompt; a model r(prompt, response)
is trained so that the preferred ("chosen") response scores higher than the other ("rejected"), with the
Bradley-Terry loss  -log sigmoid(r_chosen - r_rejected)  (`utils.alignment.reward_model_loss`).

    "Question: ...\\nAnswer: ...<eos>" -> SmolLM2 trunk (+ LoRA) -> hidden state of the last real token
                                        -> Linear(576 -> 1) -> a score (any real number; only differences count)

One base model, several roles. Lesson 13 keeps ONE copy of SmolLM2's weights in memory and gives it
adapters: the policy's LoRA (trained by PPO or DPO), the reward model's LoRA (swapped in while it scores:
`use_adapter`) and no LoRA at all, which is the frozen reference (`lora_disabled`). peft does the same
with `set_adapter` / `disable_adapter`; trl's PPO with peft keeps one base model this way.

`train_top_layers_only` trains the adapters of the last few transformer blocks only: the backward pass
then stops at the first trainable block, which makes each step several times cheaper on a CPU.
"""

from __future__ import annotations

import contextlib
import random

import torch
import torch.nn as nn

from utils.alignment import reward_model_loss
from utils.checks import check_int, check_number, check_positive_int, check_text_list
from utils.generation import pad_token_id
from utils.lora import lora_layers
from utils.notebook_outputs import ProgressBar

# ----------------------------------------------------------------------------------------------
# One base model, several adapters


def _require_lora(model) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters: call utils.lora.add_lora first")
    return layers


@contextlib.contextmanager
def lora_disabled(model):
    """Inside the block the model computes as if it had no adapters: the frozen reference.

    Each LoRALinear adds scaling * B A x; scaling 0 removes it. Example: with lora_disabled(policy): ref = policy(x)
    """
    layers = _require_lora(model).values()
    scalings = [layer.scaling for layer in layers]
    try:
        for layer in layers:
            layer.scaling = 0.0
        yield model
    finally:
        for layer, scaling in zip(layers, scalings):
            layer.scaling = scaling


def adapter_state(model) -> dict[str, torch.Tensor]:
    """A copy of the model's adapter weights, {"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r), ...}."""
    return {f"{name}.{part}": getattr(layer, part).detach().clone()
            for name, layer in _require_lora(model).items() for part in ("lora_A", "lora_B")}


@torch.no_grad()
def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (from adapter_state) into the model's adapters, which must have the same layout."""
    own = adapter_state(model)
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise ValueError("this adapter state does not fit the model's adapters (other layers, targets or rank)")
    for name, layer in lora_layers(model).items():
        layer.lora_A.copy_(state[f"{name}.lora_A"])
        layer.lora_B.copy_(state[f"{name}.lora_B"])


@contextlib.contextmanager
def use_adapter(model, state: dict[str, torch.Tensor]):
    """Inside the block the model's adapters hold `state` (e.g. the reward model's); restored afterwards."""
    saved = adapter_state(model)
    try:
        load_adapter_state(model, state)
        yield model
    finally:
        load_adapter_state(model, saved)


def train_top_layers_only(model, n_layers: int) -> int:
    """Freeze the adapters of all but the last n_layers transformer blocks; returns the trainable count.

    Gradients then flow back through the top n_layers blocks only (below them nothing needs a gradient),
    so the backward pass costs about n_layers / n_blocks of a full one. Example: SmolLM2 has 30 blocks.
    """
    _require_lora(model)
    blocks = model.get_decoder().layers
    n_layers = check_int("n_layers", n_layers, low=1, high=len(blocks))
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            if "lora_" in name:
                p.requires_grad_(i >= len(blocks) - n_layers)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# The reward model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) position of each row's last 1 (works for left and right padding).

    Example: [[1, 1, 0], [0, 1, 1]] -> [1, 2].
    """
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).int().argmax(dim=1)


class RewardModel(nn.Module):
    """Scores (question, reply) pairs: the LLM's last hidden state at the last real token -> Linear -> scalar.

    `model` is the (shared) causal LM, with LoRA adapters; `head` is the only new layer. After training,
    keep the adapter with `rm.adapter = adapter_state(model)`: `score` then swaps it in while it runs, so
    the same base model can carry another adapter (the PPO policy's) the rest of the time. Shown in lesson 13.
    """

    def __init__(self, model, tokenizer, max_tokens: int = 96):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.head = nn.Linear(model.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # every reply scores 0 before training: loss log 2
        nn.init.zeros_(self.head.bias)
        self.max_tokens = check_positive_int("max_tokens", max_tokens)
        self.adapter = None  # set after training: the adapter weights `score` swaps in

    def batch(self, questions, replies) -> dict[str, torch.Tensor]:
        """'Question: q\\nAnswer: a<eos>' for each pair, right-padded: input_ids, attention_mask (B, T)."""
        check_text_list("questions", questions)
        check_text_list("replies", replies, allow_empty_items=True)  # a policy may reply nothing at all
        if len(questions) != len(replies):
            raise ValueError(f"need one reply per question, got {len(questions)} and {len(replies)}")
        rows = []
        for q, a in zip(questions, replies):
            ids = self.tokenizer.encode(f"Question: {q}\nAnswer: {a}", add_special_tokens=False)
            rows.append(ids[: self.max_tokens - 1] + [self.tokenizer.eos_token_id])  # score sits on eos
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_token_id(self.tokenizer), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and mask -> (B,) scores."""
        hidden = self.model.get_decoder()(input_ids=input_ids,
                                          attention_mask=attention_mask).last_hidden_state   # (B, T, d)
        last = hidden[torch.arange(len(hidden)), last_token_index(attention_mask)]              # (B, d)
        return self.head(last.float()).squeeze(-1)                                               # (B,)

    @torch.no_grad()
    def score(self, questions, replies, batch_size: int = 16) -> torch.Tensor:
        """Scores of many (question, reply) pairs, (N,), with the reward model's own adapter swapped in."""
        batch_size = check_positive_int("batch_size", batch_size)
        swap = use_adapter(self.model, self.adapter) if self.adapter is not None else contextlib.nullcontext()
        scores = []
        with swap:
            for i in range(0, len(questions), batch_size):
                scores.append(self(**self.batch(questions[i:i + batch_size], replies[i:i + batch_size])))
        return torch.cat(scores)


def train_reward_model(rm: RewardModel, pairs: list[dict], epochs: int = 1, batch_size: int = 12,
                       lr: float = 1e-3, seed: int = 0) -> list[dict]:
    """Bradley-Terry training on pairs {"prompt", "chosen", "rejected"}: the adapters and the head learn.

    Each step scores the chosen and rejected replies of batch_size pairs and minimises
    -log sigmoid(r_chosen - r_rejected). Returns one record per step: loss, accuracy (the fraction of
    pairs ranked right) and margin (mean r_chosen - r_rejected), on that step's batch. Shown in lesson 13.
    """
    if not isinstance(pairs, list) or not pairs:
        raise ValueError("pairs must be a non-empty list of {'prompt', 'chosen', 'rejected'} dicts")
    epochs, batch_size = check_positive_int("epochs", epochs), check_positive_int("batch_size", batch_size)
    lr = check_number("lr", lr, low=0, low_open=True)
    params = [p for p in rm.parameters() if p.requires_grad]  # the trainable adapters and the head
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(pairs)))
    history = []
    rm.train()
    n_steps = epochs * ((len(pairs) + batch_size - 1) // batch_size)
    with ProgressBar(total=n_steps, desc="reward model") as bar:
        for epoch in range(epochs):
            random.Random(seed + epoch).shuffle(order)
            for start in range(0, len(order), batch_size):
                rows = [pairs[i] for i in order[start:start + batch_size]]
                questions = [r["prompt"] for r in rows]
                both = rm.batch(questions + questions, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
                chosen, rejected = rm(**both).chunk(2)             # (b,) and (b,): one forward for both
                loss = reward_model_loss(chosen, rejected)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                margin = (chosen - rejected).detach()
                history.append({"loss": loss.item(), "accuracy": (margin > 0).float().mean().item(),
                                "margin": margin.mean().item()})
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    rm.eval()
    return history


def pairwise_correct(rm: RewardModel, pairs: list[dict], batch_size: int = 16) -> list[bool]:
    """For each pair, does the reward model score the chosen reply above the rejected one?"""
    questions = [p["prompt"] for p in pairs]
    chosen = rm.score(questions, [p["chosen"] for p in pairs], batch_size)
    rejected = rm.score(questions, [p["rejected"] for p in pairs], batch_size)
    return (chosen > rejected).tolist()
