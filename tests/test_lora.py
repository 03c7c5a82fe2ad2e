"""utils.lora: LoRA from scratch, checked against its promises and against peft (on a tiny random Llama).

The memory checks run in a fresh Python interpreter each (a child process), so they are marked slow.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from utils.lora import (
    LoRALinear,
    add_lora,
    answer_loss,
    check_lora_args,
    count_parameters,
    linear_module_names,
    load_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    saved_activation_bytes,
    sft_batch,
)
from utils.quantization import QuantizedLinear, quantize_model

TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def shared_copy(model: nn.Module) -> nn.Module:
    """A second module tree that shares the same weight tensors (no extra memory)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero; give it values so that merges and gradients are tested for real."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


@pytest.fixture
def ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def test_zero_b_leaves_the_model_unchanged(ids):
    model = tiny_llama()
    before = model(ids).logits
    add_lora(model, TARGETS, r=4, alpha=8)
    assert torch.equal(model(ids).logits, before)
    for layer in lora_layers(model).values():
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_only_the_adapters_train(ids):
    model = tiny_llama()
    total_before = count_parameters(model)[1]
    add_lora(model, TARGETS, r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8), two layers: r * (in + out) each
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert count_parameters(model) == (expected, total_before + expected)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model(ids).logits.detach()
    for _ in range(2):  # the first step moves only B (A's gradient is zero while B is zero)
        model(ids).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(model(ids).logits, before)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


def test_merge_gives_the_same_outputs_as_the_adapters(ids):
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=16)
    randomize_b(model)
    unmerged = model(ids).logits.detach()
    merge_lora(model)
    assert not lora_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(tuple(TARGETS)))
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tiny_llama()(ids).logits, unmerged, atol=1e-3)  # the update did something


def test_merge_leaves_a_tied_weight_alone(ids):
    model = tiny_llama()  # tie_word_embeddings: lm_head.weight is the embedding table
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    add_lora(model, ["lm_head", "q_proj"], r=4, alpha=16)
    randomize_b(model)
    unmerged = model(ids).logits.detach()
    merge_lora(model)
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding, atol=0, rtol=0)  # input side unchanged
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_merge_updates_float_weights_where_they_are(ids):
    model = tiny_llama()
    before = {n: m.weight for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    expected = {n: w.detach().clone() for n, w in before.items()}
    add_lora(model, TARGETS, r=4, alpha=16)
    randomize_b(model)
    for n, layer in lora_layers(model).items():
        expected[n] += layer.delta_weight().detach()
    merge_lora(model)
    for n, m in model.named_modules():
        if n in before:  # the same tensor (no copy of the weights), now holding W + (alpha / r) B A
            assert m.weight is before[n] and not m.weight.requires_grad
            torch.testing.assert_close(m.weight, expected[n])


def test_remove_lora_restores_the_original_layers(ids):
    model = tiny_llama()
    reference = model(ids).logits.detach()
    add_lora(model, TARGETS, r=4, alpha=8)
    randomize_b(model)
    remove_lora(model)
    assert not lora_layers(model)
    assert torch.equal(model(ids).logits, reference)


def test_save_and_load_round_trip(tmp_path, ids):
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8)
    randomize_b(model)
    expected = model(ids).logits.detach()
    save_lora(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, sorted(TARGETS))
    fresh = tiny_llama()  # same seed: same base weights, no adapters
    assert not torch.allclose(fresh(ids).logits, expected, atol=1e-4)
    load_lora(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids).logits, expected)


def test_load_refuses_an_adapter_for_another_shape(tmp_path):
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8)
    save_lora(model, tmp_path / "a")
    other = tiny_llama()
    add_lora(other, TARGETS, r=2, alpha=8)
    with pytest.raises(ValueError, match=r"already has LoRA adapters \(r=2, alpha=8.*file's \(r=4, alpha=8"):
        load_lora(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        load_lora(tiny_llama(), tmp_path / "missing")


def test_load_onto_existing_adapters_checks_r_and_alpha_instead_of_ignoring_them(tmp_path, ids):
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8)
    randomize_b(model)
    save_lora(model, tmp_path / "a")
    other = tiny_llama()
    add_lora(other, TARGETS, r=4, alpha=32)  # same shapes, 4x the scaling: the old loader said nothing
    with pytest.raises(ValueError, match="alpha=32.*alpha=8"):
        load_lora(other, tmp_path / "a")
    same = tiny_llama()
    add_lora(same, TARGETS, r=4, alpha=8)  # matching adapters: the file's weights are loaded into them
    load_lora(same, tmp_path / "a")
    assert torch.equal(same(ids).logits, model(ids).logits)


def _adapter(tmp_path, **config_changes):
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8)
    folder = save_lora(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, error, match", [
    ({"r": None}, ValueError, "missing the key 'r'"),
    ({"target_modules": None}, ValueError, "missing the key 'target_modules'"),
    ({"lora_alpha": None}, ValueError, "missing the key 'lora_alpha'"),
    ({"r": 10**9}, ValueError, "r=1000000000 is above the largest rank"),
    ({"r": "4"}, TypeError, r"r \(the LoRA rank\) must be an int"),
    ({"lora_alpha": float("inf")}, ValueError, "alpha"),
    ({"lora_dropout": 1.5}, ValueError, "dropout"),
    ({"target_modules": "q_proj|v_proj"}, ValueError, "target_modules must be a list"),
    ({"target_modules": ["q_proj", "__import__('os')"]}, ValueError, "target_modules must be a list"),
    ({"target_modules": ["up_proj"]}, ValueError, "does not fit this model"),
    ({"target_modules": ["nothing"]}, ValueError, r"targets \['nothing'\], but the model's linear layers"),
    ({"peft_type": "PREFIX_TUNING"}, ValueError, "not a LoRA adapter config"),
    ({"use_dora": True}, ValueError, "use_dora=True, which this LoRA does not implement"),
    ({"use_rslora": True}, ValueError, "use_rslora=True"),
    ({"rank_pattern": {"q_proj": 64}}, ValueError, "rank_pattern"),
    ({"bias": "all"}, ValueError, "bias='all'"),
])
def test_bad_adapter_configs_are_refused_before_anything_is_allocated(tmp_path, changes, error, match):
    folder = _adapter(tmp_path, **changes)
    model = tiny_llama()
    with pytest.raises(error, match=match):
        load_lora(model, folder)
    assert not lora_layers(model)  # refused before add_lora changed the model


def test_adapter_tensors_of_the_wrong_shape_are_refused_before_they_are_read(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _adapter(tmp_path)
    state = load_file(str(folder / "adapter_model.safetensors"))
    name = next(n for n in state if n.endswith("lora_A.weight"))
    state[name] = torch.zeros(4, 100_000)  # a 400k-wide A for a 32-wide layer
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \[4, 100000\] \(F32\) in the file, \[4, 32\]"):
        load_lora(tiny_llama(), folder)
    state[name] = torch.zeros(4, 32)
    state["base_model.model.lm_head.weight"] = torch.zeros(96, 32)  # an extra tensor
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['base_model.model.lm_head.weight'\]"):
        load_lora(tiny_llama(), folder)


def _peft_twin(ours: nn.Module, base: nn.Module, r: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS))
    state = lora_state_dict(ours)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_" in name:
                param.copy_(state[name.replace(".default", "")])
    return twin


def test_parity_with_peft_outputs_and_gradients(ids):
    model = tiny_llama()
    base_twin = shared_copy(model)
    add_lora(model, TARGETS, r=4, alpha=8)
    randomize_b(model)  # non-zero B, so that A gets a gradient too
    twin = _peft_twin(model, base_twin, r=4, alpha=8)
    ours, theirs = model(ids).logits, twin(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    their_grads = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
                   for n, p in twin.named_parameters() if p.requires_grad}
    our_grads = {n.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): p.grad
                 for n, p in model.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads) and len(our_grads) == 8
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, their_grads[name], atol=1e-6, rtol=1e-5)


def test_peft_loads_our_adapter_files(tmp_path, ids):
    from peft import PeftModel

    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8)
    randomize_b(model)
    save_lora(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"r": 0}, ValueError, "r"), ({"r": -2}, ValueError, "r"), ({"r": 2.5}, TypeError, "r"),
    ({"r": True}, TypeError, "r"), ({"alpha": 0}, ValueError, "alpha"), ({"alpha": -1.0}, ValueError, "alpha"),
    ({"alpha": "8"}, TypeError, "alpha"), ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": -0.1}, ValueError, "dropout"),
])
def test_bad_hyperparameters_are_refused(kwargs, error, message):
    args = {"r": 4, "alpha": 8, "dropout": 0.0, **kwargs}
    with pytest.raises(error, match=message):
        check_lora_args(**args)
    with pytest.raises(error, match=message):
        add_lora(tiny_llama(), TARGETS, **args)
    with pytest.raises(error, match=message):
        LoRALinear(nn.Linear(4, 4), **args)
    check_lora_args(4, 8, 0.0)  # the defaults pass


def test_unknown_target_names_the_modules_that_exist():
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        add_lora(model, ["q_proj", "query"], r=4, alpha=8)
    assert "query" in str(err.value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in str(err.value)
    assert not lora_layers(model)  # nothing half-done
    assert linear_module_names(model) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj", "lm_head"])
    with pytest.raises(TypeError, match="not a linear layer"):
        add_lora(model, ["embed_tokens"], r=4, alpha=8)
    with pytest.raises(ValueError, match="non-empty"):
        add_lora(model, [], r=4, alpha=8)
    with pytest.raises(TypeError):
        LoRALinear(nn.Embedding(4, 4), r=2, alpha=2)
    add_lora(model, TARGETS, r=4, alpha=8)
    with pytest.raises(ValueError, match="already"):
        add_lora(model, TARGETS, r=4, alpha=8)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(tiny_llama())


def test_dropout_is_active_only_in_training_mode(ids):
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8, dropout=0.5)
    randomize_b(model)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    assert not torch.allclose(a, model(ids).logits)


def test_sft_batch_labels_only_the_answer():
    class Tok:  # a character-level stand-in tokenizer
        eos_token_id, pad_token_id = 0, 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    batch = sft_batch(Tok(), ["ab", "abcd"], ["X", "YZ"])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["input_ids"][0].tolist() == [97, 98, 88, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [-100, -100, 88, 0, -100, -100, -100]
    assert batch["labels"][1].tolist() == [-100, -100, -100, -100, 89, 90, 0]
    assert batch["attention_mask"].sum(1).tolist() == [4, 7]
    with pytest.raises(ValueError, match="same length"):
        sft_batch(Tok(), ["a"], ["b", "c"])
    with pytest.raises(TypeError):
        sft_batch(Tok(), "ab", "X")  # one string, not a list of prompts


def test_answer_loss_is_the_usual_causal_lm_loss():
    model = tiny_llama()
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    labels[0, 8:] = -100  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(answer_loss(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_lora_on_a_quantized_base_trains_only_the_adapters(ids):
    model = quantize_model(tiny_llama(), code="nf4", block_size=32)
    add_lora(model, TARGETS, r=4, alpha=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantizedLinear)
    randomize_b(model)
    model(ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    expected = model(ids).logits.detach()
    merge_lora(model)  # a quantised base is de-quantised into a plain float layer
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def ints_printed_by_fresh_python(code: str) -> list[int]:
    """Run `code` in a new interpreter at the repo root (memory freed by earlier tests in this
    process could hide an allocation) and return the ints it prints."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return [int(word) for word in out.stdout.split()]


@pytest.mark.slow
def test_peak_rss_sees_an_allocation():
    # In a fresh process: in this one, memory freed by earlier tests can be reused without growing RSS.
    code = (
        "import time, torch\n"
        "from utils.lora import PeakRSS\n"
        "with PeakRSS() as mem:\n"
        "    block = torch.ones(40_000_000, dtype=torch.uint8)  # 40 MB, touched\n"
        "    time.sleep(0.1)  # held for a while, like a training step holds its activations\n"
        "    del block\n"
        "print(mem.peak - mem.start)\n"
    )
    (grown,) = ints_printed_by_fresh_python(code)
    assert grown > 30_000_000


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_release_memory_gives_freed_heap_memory_back():
    # In a fresh process. 3000 tensors of 64 kB come from the heap (below malloc's mmap threshold);
    # keeping every 10th one leaves holes that malloc keeps: RSS stays up until release_memory().
    code = (
        "import torch\n"
        "from utils.lora import release_memory, rss_bytes\n"
        "blocks = [torch.ones(65_536, dtype=torch.uint8) for _ in range(3000)]  # ~200 MB, touched\n"
        "kept = blocks[::10]\n"
        "del blocks\n"
        "before = rss_bytes()\n"
        "after = release_memory()\n"
        "print(before - after)\n"
    )
    (given_back,) = ints_printed_by_fresh_python(code)
    assert given_back > 100_000_000


@pytest.mark.slow
def test_saved_activation_bytes_frees_its_graph():
    # Softmax saves its own output for backward: the case where a pack hook returning the tensor
    # itself makes a reference cycle that is never freed. In a fresh process, measured by RSS.
    code = (
        "import torch, torch.nn as nn\n"
        "from utils.lora import saved_activation_bytes, release_memory\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.Softmax(dim=-1)) for _ in range(8)])\n"
        "x = torch.randn(4096, 512)\n"
        "base = release_memory()\n"
        "for _ in range(3):\n"
        "    saved, out = saved_activation_bytes(model, lambda: model(x).sum())\n"
        "    del out\n"
        "print(saved, release_memory() - base)\n"
    )
    saved, kept = ints_printed_by_fresh_python(code)
    # A leak keeps the graphs of all 3 calls (>= 3 * saved); allocator noise after a fresh import is
    # ~20 MB. Keeping even one graph (saved) fails this.
    assert saved > 60_000_000 and kept < saved // 2, (saved, kept)


def test_saved_activation_bytes_keeps_gradients_right():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=-1), nn.Linear(8, 1))
    x = torch.randn(5, 8)
    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, loss = saved_activation_bytes(model, lambda: model(x).sum())
    loss.backward()
    for p, g in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, g)


def test_saved_activation_bytes_grow_with_tokens_and_exclude_weights():
    model = tiny_llama()
    add_lora(model, TARGETS, r=4, alpha=8)
    sizes = []
    for length in (8, 16):
        ids = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(0))
        nbytes, logits = saved_activation_bytes(model, lambda ids=ids: model(ids).logits)
        assert logits.shape == (2, length, 96)
        sizes.append(nbytes)
    assert 0 < sizes[0] < sizes[1] <= 2.5 * sizes[0]
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():  # nothing is saved without autograd
        assert saved_activation_bytes(model, lambda ids=ids: model(ids).logits)[0] == 0
    assert sizes[0] < weight_bytes  # the (larger) weights are not counted
