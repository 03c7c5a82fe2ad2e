"""Checkpoints of a training run: everything a resumed run needs to repeat the exact same loss curve.

Lesson 05 interrupts a run, resumes it from its last checkpoint and checks that the loss curve is the
same, bit for bit, as that of a run that was never interrupted. For that a checkpoint holds the model's
weights, AdamW's state (its step counts and moment estimates), the step, the configuration, the loss
history, and the states of the random number generators (the batch sampler's and torch's: dropout).

The format is safetensors (tensors) + JSON (everything else): no pickle, so loading a checkpoint cannot
run code. `utils.training.train(..., checkpoint_dir=, resume=True)` uses these functions.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for the type hints only: utils.training imports this module
    from utils.training import History, TrainConfig


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
    from utils.training import History  # here, not at the top: utils.training imports this module

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
