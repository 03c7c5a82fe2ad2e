"""Model surgery: swap a trained model's linear layers for other layers, and count its weights' bytes.

Three lessons change the linear layers of a trained model without retraining it: lesson 08 wraps them
in LoRA adapters (`utils.lora`) and stores them in 4 bits (`utils.quantization`), lesson 11 stores them
in int8 (`utils.local_inference`). Each is the same two steps:

* find the layers: `find_linear(model, skip)` names every nn.Linear (e.g. "model.layers.0.mlp.up_proj");
* swap them: `replace_linear(model, names, make)` puts `make(old_layer)` where each named layer was, one
  layer at a time, so that an old float weight can be freed before the next new layer is built.

`weight_bytes(model)` measures what a swap buys: the bytes of the tensors a model stores, each block of
memory (storage) counted once. SmolLM2's embedding table and output layer are one tensor: counting it
twice would add 113 MB that do not exist.
"""

from __future__ import annotations

import torch.nn as nn


def is_linear(module) -> bool:
    """nn.Linear, or a layer that stands in for one (in_features, out_features and a
    `dequantized_weight()`, as utils.quantization.QuantizedLinear has). Example: nn.Linear(2, 3) -> True."""
    return isinstance(module, nn.Linear) or all(
        hasattr(module, attribute) for attribute in ("in_features", "out_features", "dequantized_weight"))


def find_linear(model: nn.Module, skip=()) -> list[str]:
    """Names of the model's nn.Linear layers, except those whose last name part (or whole name) is in skip.

    Example: nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)) -> ["0", "2"];
    with skip=["2"] -> ["0"].
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    skip = {skip} if isinstance(skip, str) else set(skip or ())
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and name and name not in skip and name.rsplit(".", 1)[-1] not in skip]


def replace_linear(model: nn.Module, names, make) -> nn.Module:
    """Put `make(layer)` in place of each named layer of `model`, in place; returns the model.

    One layer at a time: once a layer is replaced nothing refers to it any more, so its float weight
    can be freed before the next one is converted (the peak memory is the model plus one layer).
    """
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"names must be a list of module names such as 'model.layers.0.mlp.up_proj', "
                        f"got {names!r}"[:300])
    for name in names:
        parent_name, _, child = name.rpartition(".")  # "model.layers.0.mlp" and "up_proj"
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors `model` stores (parameters and buffers), each storage counted once.

    Two tensors that share memory (tied weights: SmolLM2's output layer reuses the embedding table)
    are one storage and count once. torch's dynamically quantised Linear layers keep their packed
    int8 weights outside parameters() and buffers(); they are counted too.
    Example: nn.Linear(4, 2) -> (4 * 2 + 2) * 4 bytes = 40.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    storages = {}  # address of a storage -> its size in bytes
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    total = sum(storages.values())
    for module in model.modules():  # torch.ao's DynamicQuantizedLinear: weight() and bias() are methods
        if getattr(module, "_packed_params", None) is not None and callable(getattr(module, "weight", None)):
            weight = module.weight()  # an int8 quantised tensor, unpacked for us
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return total
