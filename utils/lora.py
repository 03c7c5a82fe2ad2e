"""LoRA from scratch: low-rank adapters on a frozen model, merged or saved as a small file (lesson 08).

LoRA (Hu et al., 2021) leaves a pretrained weight W (out x in) frozen and learns a low-rank update:

    y = W x + (alpha / r) * B A x        A: (r, in), B: (out, r), r << min(in, out)

B starts at zero, so at step 0 the model is exactly the pretrained one; only A and B train
(r * (in + out) numbers per layer instead of in * out). After training, W + (alpha / r) B A can
be merged into one matrix: no extra cost at inference.

* `LoRALinear(base, r, alpha, dropout)`: wraps one nn.Linear (or a `QuantizedLinear`: QLoRA).
* `add_lora(model, target_modules, r, alpha)`: wraps the named linear layers, freezes the rest.
* `merge_lora(model)` / `remove_lora(model)`: fold the adapters into the weights / drop them.
  All three swap layers with `utils.model_surgery.replace_linear`.
* `save_lora` / `load_lora`: adapters as safetensors in the same layout as peft
  (`adapter_model.safetensors` + `adapter_config.json`), so peft can load them too.
* `sft_batch` and `answer_loss`: supervised fine-tuning on (prompt, answer) pairs, with the loss
  (and the big output layer) computed on the answer tokens only.
* `PeakRSS`: peak resident memory of this process while a block of code runs; `release_memory`
  hands memory that PyTorch freed back to the operating system.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoints import read_json_object, require_keys, safetensors_header
from utils.checks import check_number, check_positive_int, check_text_list
from utils.generation import pad_token_id
from utils.model_surgery import is_linear, replace_linear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MAX_LORA_RANK = 1024  # LoRA ranks in practice are 4-256; a file asking for more is refused before allocating


def check_lora_args(r, alpha, dropout) -> None:
    """LoRA's hyper-parameters: r an int >= 1, alpha > 0 (the update is scaled by alpha / r), dropout in
    [0, 1). Example: check_lora_args(8, 16, 0.05) passes; r=0 -> ValueError, r=2.5 -> TypeError."""
    check_positive_int("r (the LoRA rank)", r)
    check_number("alpha (the update is scaled by alpha / r)", alpha, low=0, low_open=True)
    check_number("dropout", dropout, low=0, high=1, high_open=True)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (alpha / r) * B A. Shown in lesson 08."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_lora_args(r, alpha, dropout)
        if not is_linear(base):
            raise TypeError(f"LoRALinear wraps a linear layer, got {type(base).__name__}")
        if isinstance(base, LoRALinear):
            raise TypeError("this layer already has a LoRA adapter")
        self.base = base
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if weight is not None else torch.float32
        device = weight.device if weight is not None else base.absmax.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # B (A x): never forms B A
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix, (out, in): (alpha / r) * B A."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what `target_modules` can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_linear(m)})


def add_lora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """Wrap every linear layer whose name ends with one of `target_modules` in a LoRALinear.

    All other parameters are frozen; only the adapters' A and B train. Changes `model` in place
    and returns it. target_modules: e.g. ["q_proj", "v_proj"] (last part of the module name).
    Shown in lesson 08.
    """
    check_lora_args(r, alpha, dropout)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = list(target_modules) if target_modules is not None else []
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge_lora or remove_lora first")
    found = {t: [] for t in targets}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in found:
            found[leaf].append((name, module))
    missing = [t for t, hits in found.items() if not hits]
    if missing:
        raise ValueError(f"no module named {missing} in the model; linear layers that exist: "
                         f"{linear_module_names(model)}")
    for hits in found.values():
        for name, module in hits:
            if not is_linear(module):
                raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer; LoRA here wraps "
                                f"linear layers: {linear_module_names(model)}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for hits in found.values() for name, _ in hits]
    return replace_linear(model, names, lambda linear: LoRALinear(linear, r, alpha, dropout))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapters by module name, e.g. {"model.layers.0.self_attn.q_proj": LoRALinear(...)}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, W <- W + (alpha / r) B A, and unwrap it (in place).

    A float base layer is updated where it is (no second copy of the weights, and afterwards no extra
    work per token); a quantised base, or a weight the model also uses elsewhere (tied embeddings), goes
    into a new plain float nn.Linear instead. Shown in lesson 08.
    """
    names = list(lora_layers(model))
    if not names:
        raise ValueError("the model has no LoRA adapters to merge")
    # a weight stored once and used twice (SmolLM2's output layer is its embedding table) must not be
    # changed in place: the other use would change too. Such a layer gets a merged copy instead.
    uses = Counter(p.untyped_storage().data_ptr() for _, p in model.named_parameters(remove_duplicate=False))

    @torch.no_grad()
    def merged(layer: LoRALinear) -> nn.Linear:
        base = layer.base
        shared = getattr(base, "weight", None) is not None and uses[base.weight.untyped_storage().data_ptr()] > 1
        if not hasattr(base, "dequantized_weight") and not shared:  # add the update to the layer's own weight
            base.weight.add_(layer.delta_weight().to(base.weight.dtype))
            return base.requires_grad_(False)
        weight = base.dequantized_weight() if hasattr(base, "dequantized_weight") else base.weight
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight + layer.delta_weight().to(weight.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)

    return replace_linear(model, names, merged)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters and put the original layers back (in place)."""
    return replace_linear(model, list(lora_layers(model)), lambda layer: layer.base)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once. Example: nn.Linear(4, 2) -> (10, 10)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------
# Saving and loading adapters (peft's file layout)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only, named as peft names them in adapter_model.safetensors."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    if not out:
        raise ValueError("the model has no LoRA adapters")
    return out


def save_lora(model: nn.Module, folder, base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> Path:
    """Write adapter_model.safetensors + adapter_config.json to `folder` (a few hundred kB)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    state = lora_state_dict(model)
    first = next(iter(layers.values()))
    if any((m.r, m.alpha, m.dropout_p) != (first.r, first.alpha, first.dropout_p) for m in layers.values()):
        raise ValueError("all adapters must share r, alpha and dropout to be saved in one config")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout_p, "bias": "none",
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def _check_adapter_config(config: dict, where: str) -> dict:
    """adapter_config.json's keys, types and bounds; features we do not implement are refused, not ignored."""
    require_keys(config, ("peft_type", "r", "lora_alpha", "target_modules"), where)
    if config["peft_type"] != "LORA":
        raise ValueError(f"{where} is not a LoRA adapter config (peft_type={config['peft_type']!r})")
    check_lora_args(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    if config["r"] > MAX_LORA_RANK:
        raise ValueError(f"{where}: r={config['r']} is above the largest rank this loader accepts, "
                         f"{MAX_LORA_RANK}")
    targets = config["target_modules"]
    if (not isinstance(targets, list) or not 1 <= len(targets) <= 64
            or not all(isinstance(t, str) and t.isidentifier() for t in targets)):
        raise ValueError(f"{where}: target_modules must be a list of 1 to 64 module names, got {targets!r}"[:300])
    # peft options that change what the adapter computes (DoRA, rank-stabilised scaling, per-layer
    # ranks, extra trained modules...): loading the file without them would silently give other
    # outputs, so a file that turns one on is refused. (None, False, [] and {} mean "off".)
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where} sets bias={config['bias']!r}; this LoRA trains no biases (only 'none')")
    for key in ("use_dora", "use_rslora", "use_qalora", "fan_in_fan_out", "lora_bias", "modules_to_save",
                "exclude_modules", "layers_to_transform", "rank_pattern", "alpha_pattern", "layer_replication",
                "target_parameters", "trainable_token_indices", "alora_invocation_tokens"):
        if config.get(key):
            raise ValueError(f"{where} sets {key}={config[key]!r}, which this LoRA does not implement"[:300])
    return config


def load_lora(model: nn.Module, folder) -> nn.Module:
    """Add adapters as described by folder/adapter_config.json and load their weights (safetensors only).

    Both files are checked before anything is allocated: the config's keys and bounds, then every
    tensor's name, shape and dtype in the safetensors header. A model that already has adapters is
    accepted only if they have the file's r and alpha on the same layers (else remove_lora first).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder} must contain {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = _check_adapter_config(read_json_object(config_path, max_bytes=1_000_000), str(config_path))
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    existing = lora_layers(model)
    if existing:
        adapted = sorted({name.rsplit(".", 1)[-1] for name in existing})
        if adapted != sorted(set(targets)) or any((m.r, m.alpha) != (r, alpha) for m in existing.values()):
            first = next(iter(existing.values()))
            raise ValueError(f"the model already has LoRA adapters (r={first.r}, alpha={first.alpha} on "
                             f"{adapted}) that do not match the file's (r={r}, alpha={alpha} on "
                             f"{sorted(set(targets))}): remove_lora(model) first")
        expected = {n: tuple(t.shape) for n, t in lora_state_dict(model).items()}
    else:  # the tensors add_lora would create, computed without creating them
        layers = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets}
        if not layers or not all(is_linear(m) for m in layers.values()):
            raise ValueError(f"{config_path} targets {targets}, but the model's linear layers are "
                             f"{linear_module_names(model)}")
        expected = {}
        for name, m in layers.items():
            expected[f"base_model.model.{name}.lora_A.weight"] = (r, m.in_features)
            expected[f"base_model.model.{name}.lora_B.weight"] = (m.out_features, r)
    header = safetensors_header(weights_path)
    if set(header) != set(expected):
        raise ValueError(f"the adapter file does not fit this model: missing {sorted(set(expected) - set(header))[:3]}, "
                         f"unexpected {sorted(set(header) - set(expected))[:3]}")
    for name, (shape, dtype) in header.items():
        if shape != expected[name] or dtype not in ("F32", "F16", "BF16"):
            raise ValueError(f"{name} has shape {list(shape)} ({dtype}) in the file, {list(expected[name])} "
                             "(a float tensor) in the model")
    if not existing:
        add_lora(model, targets, r, alpha, config.get("lora_dropout", 0.0))
    state = load_file(str(weights_path))  # every tensor checked above: no surprise allocation
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for part in ("lora_A", "lora_B"):
                getattr(layer, part).copy_(state[f"base_model.model.{name}.{part}.weight"])
    return model


# ------------------------------------------------------------------------------------------------
# Supervised fine-tuning on (prompt, answer) pairs


def sft_batch(tokenizer, prompts, answers, device=None) -> dict[str, torch.Tensor]:
    """Token ids of prompt + answer + end-of-sequence, right-padded, with labels on the answer only.

    labels is -100 (ignored by the loss) on the prompt and on padding: the model is trained to
    write the answer, not to repeat the question.
    """
    check_text_list("prompts", prompts)
    check_text_list("answers", answers)
    if len(prompts) != len(answers):
        raise ValueError(f"prompts and answers must have the same length, got {len(prompts)} and "
                         f"{len(answers)}")
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)  # the tokenizer's pad token, else eos (lesson 07's rule)
    rows = []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        a = tokenizer.encode(answer, add_special_tokens=False) + [eos]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def answer_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; the output layer runs on answer positions only.

    The output layer (576 -> 49152 for SmolLM2) is a fifth of the model's compute; running it
    only where a label exists (the answer is a third of each sequence) saves time and memory.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, d)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = targets != -100  # (B, T-1)
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N answer tokens, vocab)
    return F.cross_entropy(logits.float(), targets[keep])


# ------------------------------------------------------------------------------------------------
# Measuring memory


def saved_activation_bytes(model: nn.Module, fn):
    """(bytes autograd keeps for the backward pass while `fn()` runs, fn's result).

    Counts every distinct tensor storage saved for backward except the model's own parameters and
    buffers: the activations. Exact and deterministic, unlike the process's resident memory.
    """
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        # Not `t` itself: when t is the output of the operation saving it (softmax, exp...), t refers
        # to that operation's graph node, which would refer back to t: a cycle that is never freed.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


def rss_bytes() -> int:
    """Current resident memory of this process."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        import psutil

        return psutil.Process().memory_info().rss


def release_memory() -> int:
    """Free unreachable objects and hand freed heap memory back to the OS; returns the RSS after.

    PyTorch frees a CPU tensor into the C allocator (malloc), which keeps the memory for later
    allocations instead of returning it; after many differently sized tensors the heap is full of
    holes and the process's resident memory (RSS) keeps growing. On Linux (glibc), `malloc_trim`
    gives the free pages back. Elsewhere only the garbage collection runs.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass
    return rss_bytes()


def peak_rss_bytes() -> int:
    """Highest resident memory this process has had so far (Linux VmHWM; else the current RSS)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes()


class PeakRSS:
    """Peak resident memory while the `with` block runs, sampled every `interval` seconds.

    >>> with PeakRSS() as mem:
    ...     x = b"x" * 50_000_000
    >>> mem.peak - mem.start > 40_000_000
    True
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False
