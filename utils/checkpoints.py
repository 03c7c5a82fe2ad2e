"""Checkpoints of a training run: everything a resumed run needs to repeat the exact same loss curve.

Lesson 05 interrupts a run, resumes it from its last checkpoint and checks that the loss curve is the
same, bit for bit, as that of a run that was never interrupted. For that a checkpoint holds the model's
weights, AdamW's state (its step counts and moment estimates), the step, the configuration, the loss
history, and the states of the random number generators (the batch sampler's and torch's: dropout).

The format is safetensors (tensors) + JSON (everything else): no pickle, so loading a checkpoint cannot
run code. `utils.training.train(..., checkpoint_dir=, resume=True)` uses these functions.

A checkpoint folder is also untrusted input (copied from a shared drive, half-written, edited): before
any tensor is read, `load_checkpoint` checks trainer.json (size, required keys, types, the
configuration's bounds) and the safetensors headers (every tensor's name, shape and dtype must be
one the model or optimizer has), so a file can never make it allocate more than the model itself.
Checkpoint folders are ordered by their step as a number: step_1000000 comes after step_999999.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for the type hints only: utils.training imports this module
    from utils.training import History, TrainConfig


CHECKPOINT_FORMAT = 1
MAX_JSON_BYTES = 100_000_000  # trainer.json of a 2,000-step run is ~100 kB; its history grows ~60 B/step
MAX_RNG_STATE_BYTES = 1 << 16  # torch's CPU generator state is 5,056 bytes, a CUDA one 16
_CHECKPOINT_NAME = re.compile(r"step_(\d+)")
_ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # what AdamW keeps per parameter
# safetensors' names for the dtypes a checkpoint can hold
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
                      torch.bool: "BOOL"}


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


# ------------------------------------------------------------------------------------------------
# Checking files before anything is read from them


def read_json_object(path, max_bytes: int | None = None) -> dict:
    """The JSON object in a file of at most max_bytes (default MAX_JSON_BYTES), or a ValueError."""
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{path} is {size:,} bytes; at most {max_bytes:,} are allowed")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_keys(data: dict, keys, where: str) -> None:
    """A ValueError naming the first missing key (never a bare KeyError).

    Example: require_keys({"r": 8}, ["r", "lora_alpha"], "adapter_config.json") -> ValueError
    "adapter_config.json is missing the key 'lora_alpha'"."""
    for key in keys:
        if key not in data:
            raise ValueError(f"{where} is missing the key {key!r}")


def safetensors_header(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from a safetensors file's header, without reading any tensor.

    Example: a file holding a 2x3 float32 "w" -> {"w": ((2, 3), "F32")}.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                    for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def check_tensors_fit(path, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor in the file must be one of `expected` with the same shape and dtype.

    Then loading the file allocates at most what `expected` (the model's own tensors) already
    takes. Tensors of `expected` that the file lacks are not an error here (a tied weight is saved
    once); the loader reports them.
    """
    for name, (shape, dtype) in safetensors_header(path).items():
        if name not in expected:
            raise ValueError(f"{path} holds a tensor {name!r} that the model does not have")
        want = expected[name]
        want_dtype = SAFETENSORS_DTYPES.get(want.dtype, str(want.dtype))
        if shape != tuple(want.shape) or dtype != want_dtype:
            raise ValueError(f"{path}: {name} is {dtype} {list(shape)} in the file, but "
                             f"{want_dtype} {list(want.shape)} in the model")


def _check_trainer_meta(meta: dict, where: str) -> None:
    """trainer.json's keys, types and bounds, before any of it is used."""
    from utils.training import History, TrainConfig

    require_keys(meta, ("format", "step", "config", "optimizer", "history"), where)
    if meta["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown checkpoint format {meta['format']!r} (this code reads {CHECKPOINT_FORMAT})")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{where}: 'config' must be an object")
    require_keys(meta["config"], [f.name for f in fields(TrainConfig)], f"{where}'s config")
    try:
        config = TrainConfig(**meta["config"])  # its own checks: types and bounds of every field
    except TypeError as err:  # an unknown field, or a wrong type
        raise ValueError(f"{where}: bad config: {err}") from None
    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= config.max_steps:
        raise ValueError(f"{where}: step must be an int in [0, max_steps={config.max_steps}], got {step!r}")
    optimizer = meta["optimizer"]
    if (not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list)
            or not isinstance(optimizer.get("scalars"), dict)
            or not all(isinstance(g, dict) for g in optimizer["param_groups"])):
        raise ValueError(f"{where}: 'optimizer' must be {{'param_groups': [{{...}}], 'scalars': {{...}}}}")
    for group in optimizer["param_groups"]:  # AdamW's hyper-parameters: numbers, flags, parameter ids
        for key, value in group.items():
            ok = (isinstance(value, list) and key in ("params", "betas")
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                  ) or value is None or isinstance(value, (bool, int, float))
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{where}: optimizer setting {key!r} = {value!r} is not a finite "
                                 "number, flag or list of numbers"[:300])
    for name, value in optimizer["scalars"].items():
        if not re.fullmatch(r"\d+\.[a-z_]+", name) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: optimizer scalar {name!r} = {value!r} is not "
                             "'<parameter id>.<state name>' = number"[:300])
    history = meta["history"]
    if not isinstance(history, dict):
        raise ValueError(f"{where}: 'history' must be an object")
    require_keys(history, [f.name for f in fields(History)], f"{where}'s history")
    for group in (("step", "loss", "lr"), ("eval_step", "train_loss", "val_loss")):
        columns = [history[name] for name in group]
        if (not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1
                or not all(isinstance(v, (int, float)) for c in columns for v in c)):
            raise ValueError(f"{where}: history {group} must be lists of numbers of one length")


def _check_trainer_tensors(path, optimizer) -> None:
    """trainer.safetensors may hold RNG states and, for this optimizer's parameters, AdamW's state."""
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    for name, (shape, dtype) in safetensors_header(path).items():
        if name in ("rng.torch", "rng.data") or re.fullmatch(r"rng\.cuda\.\d+", name):
            if dtype != "U8" or len(shape) != 1 or shape[0] > MAX_RNG_STATE_BYTES:
                raise ValueError(f"{path}: {name} must be a uint8 vector of at most "
                                 f"{MAX_RNG_STATE_BYTES} bytes, got {dtype} {list(shape)}")
            continue
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "optimizer" or not parts[1].isdigit() or parts[2] not in _ADAMW_STATE:
            raise ValueError(f"{path} holds an unexpected tensor {name!r}")
        if optimizer is None:
            continue  # not read at all
        param_id = int(parts[1])
        if param_id >= len(params):
            raise ValueError(f"{path}: {name} is for parameter {param_id}, but the optimizer has "
                             f"{len(params)} parameters")
        want = () if parts[2] == "step" else tuple(params[param_id].shape)
        if shape != want or dtype not in ("F32", "F64", SAFETENSORS_DTYPES.get(params[param_id].dtype)):
            raise ValueError(f"{path}: {name} is {dtype} {list(shape)}, but the parameter needs "
                             f"{list(want)} (a float tensor)")


def load_checkpoint(directory, model, optimizer=None, data_generator: torch.Generator | None = None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint folder into model (and optimizer, RNG states); returns trainer.json's dict
    with "history" as a History object. Every file is checked before a tensor is read."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    directory = Path(directory)
    for name in ("model.safetensors", "trainer.safetensors", "trainer.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a complete checkpoint: {name} is missing")
    meta = read_json_object(directory / "trainer.json")
    _check_trainer_meta(meta, str(directory / "trainer.json"))
    check_tensors_fit(directory / "model.safetensors", model.state_dict())
    _check_trainer_tensors(directory / "trainer.safetensors", optimizer)
    if optimizer is not None:
        groups = meta["optimizer"]["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"the checkpoint's optimizer has parameter groups of sizes "
                             f"{[len(g['params']) for g in groups]}, this one "
                             f"{[len(g['params']) for g in optimizer.param_groups]}: not the same model")

    device = next(model.parameters()).device
    load_model(model, str(directory / "model.safetensors"), device=str(device))
    with safe_open(str(directory / "trainer.safetensors"), framework="pt") as f:
        wanted = [n for n in f.keys() if optimizer is not None or not n.startswith("optimizer.")]
        tensors = {name: f.get_tensor(name) for name in wanted}  # only what will be used
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if restore_rng:
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if data_generator is not None and "rng.data" in tensors:
            data_generator.set_state(tensors["rng.data"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    from utils.training import History  # here, not at the top: utils.training imports this module

    meta["history"] = History.from_dict(meta["history"])
    return meta


def checkpoint_step(path) -> int | None:
    """The step of a checkpoint folder from its name, or None. Example: "step_1000000" -> 1000000."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(checkpoint_dir) -> list[Path]:
    """The complete checkpoint folders (step_N with a trainer.json), oldest first by step NUMBER.

    Sorting the names as text would put step_1000000 before step_999999 (and delete the newest).
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if checkpoint_step(p) is not None and p.is_dir()
            and (p / "trainer.json").is_file()]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(checkpoint_dir) -> Path | None:
    """The complete checkpoint (step_N folder) with the highest step, or None."""
    done = complete_checkpoints(checkpoint_dir)
    return done[-1] if done else None
