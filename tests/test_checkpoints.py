"""utils.checkpoints: files checked before anything is read from them, and numeric checkpoint order.

(The exact-resume round trip is in tests/test_training.py.) Each test saves a real checkpoint of a
2-layer, 32-wide GPT, damages one thing in it, and checks the refusal names what is wrong.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from utils.checkpoints import (
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    safetensors_header,
    save_checkpoint,
)
from utils.gpt import GPT, GPTConfig
from utils.training import History, TrainConfig, make_optimizer

CONFIG = TrainConfig(max_steps=30, batch_size=2, block_size=8, warmup_steps=2, eval_interval=10, eval_iters=1)


def tiny_gpt(vocab_size=20):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=32, bias=False))


@pytest.fixture
def saved(tmp_path):
    """A checkpoint after one AdamW step: (folder, model, optimizer)."""
    model = tiny_gpt()
    optimizer = make_optimizer(model, CONFIG)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    history = History(step=[1], loss=[3.0], lr=[1e-3], eval_step=[0], train_loss=[3.1], val_loss=[3.2])
    folder = save_checkpoint(tmp_path / "step_000001", model, optimizer, 1, history, CONFIG,
                             torch.Generator().manual_seed(0))
    return folder, model, optimizer


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_an_intact_checkpoint_loads(saved):
    folder, model, optimizer = saved
    fresh = tiny_gpt()
    meta = load_checkpoint(folder, fresh, make_optimizer(fresh, CONFIG))
    assert meta["step"] == 1 and meta["history"].loss == [3.0]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert "model.transformer.wte.weight" not in safetensors_header(folder / "model.safetensors")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("history"), "missing the key 'history'"),
    (lambda m: m["config"].pop("lr"), "config is missing the key 'lr'"),
    (lambda m: m["history"].pop("val_loss"), "history is missing the key 'val_loss'"),
    (lambda m: m["config"].update(lr=float("inf")), "lr must be a finite number"),
    (lambda m: m["config"].update(max_steps="30"), "max_steps must be an int"),
    (lambda m: m["config"].update(n_embd=10**9), "unexpected keyword argument 'n_embd'"),
    (lambda m: m.update(step=-1), r"step must be an int in \[0, max_steps=30\]"),
    (lambda m: m.update(step=10**12), r"step must be an int in \[0, max_steps=30\]"),
    (lambda m: m.update(format=99), "unknown checkpoint format 99"),
    (lambda m: m["history"].update(loss=[1.0, 2.0]), "must be lists of numbers of one length"),
    (lambda m: m["optimizer"]["param_groups"][0].update(lr="fast"), "optimizer setting 'lr'"),
    (lambda m: m["optimizer"]["param_groups"][0].update(params=[{"x": 1}]), "optimizer setting 'params'"),
    (lambda m: m["optimizer"]["param_groups"].pop(), "parameter groups of sizes"),
    (lambda m: m["optimizer"]["scalars"].update({"x": 1}), "optimizer scalar 'x'"),
])
def test_a_bad_trainer_json_is_a_value_error_naming_what_is_wrong(saved, edit, match):
    folder, _, _ = saved
    _edit_json(folder / "trainer.json", edit)
    model = tiny_gpt()
    with pytest.raises(ValueError, match=match):
        load_checkpoint(folder, model, make_optimizer(model, CONFIG))


def test_trainer_json_that_is_not_json_or_too_big_is_refused(saved, monkeypatch):
    folder, _, _ = saved
    (folder / "trainer.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(folder, tiny_gpt())
    monkeypatch.setattr("utils.checkpoints.MAX_JSON_BYTES", 1000)
    (folder / "trainer.json").write_text(" " * 1001)
    with pytest.raises(ValueError, match="at most 1,000"):
        load_checkpoint(folder, tiny_gpt())


def test_weights_of_another_shape_are_refused_before_they_are_read(saved):
    """A model.safetensors whose embedding claims a 50,000-token vocabulary never reaches the loader."""
    folder, _, _ = saved
    weights = load_file(str(folder / "model.safetensors"))
    weights["transformer.wte.weight"] = torch.zeros(50_000, 32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"transformer.wte.weight is F32 \[50000, 32\] in the file, but "
                                         r"F32 \[20, 32\] in the model"):
        load_checkpoint(folder, tiny_gpt())


@pytest.mark.parametrize("name, tensor, match", [
    ("extra.weight", torch.zeros(3), "a tensor 'extra.weight' that the model does not have"),
    ("transformer.h.0.ln_1.weight", torch.zeros(32, dtype=torch.float64), "F64 \\[32\\] in the file"),
])
def test_unknown_or_mistyped_weights_are_refused(saved, name, tensor, match):
    folder, _, _ = saved
    weights = load_file(str(folder / "model.safetensors"))
    weights[name] = tensor
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(folder, tiny_gpt())


@pytest.mark.parametrize("name, tensor, match", [
    ("optimizer.0.exp_avg", torch.zeros(10_000, 1000), "the parameter needs"),
    ("optimizer.99.exp_avg", torch.zeros(3), "parameter 99, but the optimizer has"),
    ("optimizer.0.momentum_buffer", torch.zeros(3), "unexpected tensor 'optimizer.0.momentum_buffer'"),
    ("rng.torch", torch.zeros(1 << 20, dtype=torch.uint8), "uint8 vector of at most 65536 bytes"),
    ("payload", torch.zeros(1), "unexpected tensor 'payload'"),
])
def test_trainer_tensors_are_checked_against_the_optimizer(saved, name, tensor, match):
    folder, _, _ = saved
    tensors = load_file(str(folder / "trainer.safetensors"))
    tensors[name] = tensor
    save_file(tensors, str(folder / "trainer.safetensors"))
    model = tiny_gpt()
    with pytest.raises(ValueError, match=match):
        load_checkpoint(folder, model, make_optimizer(model, CONFIG))


def test_a_file_that_is_not_safetensors_is_a_value_error(saved):
    folder, _, _ = saved
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(folder, tiny_gpt())


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    for step in (999_999, 1_000_000, 20):
        folder = tmp_path / f"step_{step:06d}"
        folder.mkdir()
        (folder / "trainer.json").write_text("{}")
    (tmp_path / "step_2000000.tmp").mkdir()  # an unfinished save
    (tmp_path / "step_3000000").mkdir()  # no trainer.json: incomplete
    (tmp_path / "step_x").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000020", "step_999999", "step_1000000"]
    assert latest_checkpoint(tmp_path).name == "step_1000000"  # as text, step_999999 would be "newest"
    assert checkpoint_step("step_1000000") == 1_000_000 and checkpoint_step("step_1.tmp") is None
    assert complete_checkpoints(tmp_path / "nowhere") == [] and latest_checkpoint(tmp_path / "nowhere") is None
