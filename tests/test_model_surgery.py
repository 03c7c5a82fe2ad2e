"""utils.model_surgery: finding and swapping linear layers, and counting weight bytes (each storage once)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn

from utils.local_inference import Int8Linear, quantize_int8_dynamic
from utils.lora import LoRALinear
from utils.model_surgery import find_linear, is_linear, replace_linear, weight_bytes
from utils.quantization import QuantizedLinear


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))


def test_is_linear():
    assert is_linear(nn.Linear(2, 3)) and is_linear(QuantizedLinear(nn.Linear(64, 2)))
    assert not is_linear(nn.Embedding(4, 2)) and not is_linear(LoRALinear(nn.Linear(2, 3), r=1, alpha=1))


def test_find_linear_skips_by_last_name_part_or_whole_name():
    model = mlp()
    assert find_linear(model) == ["0", "2.0", "2.1"]
    assert find_linear(model, skip=["1"]) == ["0", "2.0"]  # "2.1" ends with "1"
    assert find_linear(model, skip="2.0") == ["0", "2.1"]
    with pytest.raises(TypeError):
        find_linear("not a model")


def test_replace_linear_swaps_nested_layers_in_place():
    model = mlp()
    x = torch.randn(3, 8)
    reference = model(x)
    out = replace_linear(model, find_linear(model), lambda linear: Int8Linear(linear))
    assert out is model
    assert [type(m).__name__ for m in (model[0], model[2][0], model[2][1])] == ["Int8Linear"] * 3
    assert (model(x) - reference).norm() / reference.norm() < 0.02
    with pytest.raises(TypeError):
        replace_linear(model, "0", lambda layer: layer)  # one name as a string: a list is needed


def test_replace_linear_frees_each_old_layer_before_building_the_next():
    model = mlp()
    names = find_linear(model)
    old = [weakref.ref(model.get_submodule(name)) for name in names]
    alive_while_building = []

    def make(linear):
        gc.collect()
        alive_while_building.append(sum(ref() is not None for ref in old))
        return Int8Linear(linear)

    replace_linear(model, names, make)
    # building layer k: the k already replaced are gone; layer k itself and the ones after it are alive
    assert alive_while_building == [3, 2, 1]


def test_weight_bytes_counts_each_storage_once():
    assert weight_bytes(nn.Linear(4, 2)) == (4 * 2 + 2) * 4
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: one parameter
    assert weight_bytes(nn.ModuleList([emb, head])) == 10 * 4 * 4
    # two different tensors on one storage (a detached view): still one block of memory
    shared = nn.Linear(4, 10, bias=False)
    shared.register_buffer("transposed", shared.weight.detach().T)
    assert weight_bytes(shared) == 10 * 4 * 4


def test_weight_bytes_counts_integer_and_packed_weights():
    layer = Int8Linear(nn.Linear(64, 32))  # int8 buffer, float32 scales and bias
    assert weight_bytes(layer) == 64 * 32 + 32 * 4 + 32 * 4
    model = nn.Sequential(nn.Linear(256, 256))
    quantized = quantize_int8_dynamic(model)  # torch's layer keeps its int8 weight outside buffers()
    assert weight_bytes(model) == (256 * 256 + 256) * 4
    assert weight_bytes(quantized) == 256 * 256 + 256 * 4
