"""Running models locally: what a quantised file holds, and what quantisation buys (lesson 11).

Three ideas, each small enough to check by hand:

* **GGUF and Q4_1** (llama.cpp's file format). The course's chat model ships as a GGUF file whose
  big matrices are stored in Q4_1 blocks: 32 weights share one fp16 scale `d` and one fp16 minimum
  `m`, and each weight is a 4-bit integer q in 0..15, so  w = d * q + m.  A block takes
  2 + 2 + 16 = 20 bytes for 32 weights: 5 bits per weight instead of 32.
  `quantize_q4_1` / `dequantize_q4_1` are that block format from scratch (numpy);
  `gguf_tensor_summary` reads the real file with the `gguf` package.
* **Dynamic int8 quantisation** (PyTorch): nn.Linear weights stored as int8 with a scale; the
  activations are quantised on the fly ("dynamic") at each call. `Int8Linear` is the idea from
  scratch (per-token or per-tensor activation scales); `quantize_int8_dynamic` applies it (with
  `utils.model_surgery.replace_linear`), or torch's own int8 kernels (fast); `generation_speed` and
  `model_perplexity` (with `utils.model_surgery.weight_bytes`) measure what changed.
* **Memory bandwidth bounds generation speed**: every new token reads every weight once, so
  tokens/s <= bandwidth / bytes of weights. `bandwidth_bound_tokens_per_s` is that arithmetic;
  `measure_memory_bandwidth` measures this machine's.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checks import check_choice, check_int, check_number, check_positive_int
from utils.model_surgery import find_linear, replace_linear

# ----------------------------------------------------------------------------------------------
# Q4_1 blocks, from scratch

Q4_1_BLOCK = 32  # weights per block
Q4_1_BYTES = 20  # fp16 d (2 bytes) + fp16 m (2 bytes) + 32 four-bit values (16 bytes)


def dequantize_q4_1(raw) -> np.ndarray:
    """Q4_1 bytes -> float32 weights. raw: uint8 array of n_blocks * 20 bytes -> (n_blocks * 32,).

    Block layout (ggml's block_q4_1): d (fp16), m (fp16), then 16 bytes whose LOW nibbles are
    weights 0..15 and whose HIGH nibbles are weights 16..31. Shown in lesson 11.
    """
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"raw must be a uint8 array of Q4_1 bytes, got dtype {raw.dtype}")
    if raw.size % Q4_1_BYTES:
        raise ValueError(f"Q4_1 data is a whole number of {Q4_1_BYTES}-byte blocks; got {raw.size} bytes")
    blocks = raw.reshape(-1, Q4_1_BYTES)                            # (n_blocks, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)   # (n_blocks, 1) scale
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)   # (n_blocks, 1) minimum
    qs = blocks[:, 4:]                                              # (n_blocks, 16) packed nibbles
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)                # (n_blocks, 32) in 0..15
    w = d * q + m                                                   # (n_blocks, 32)
    return w.reshape(-1)


def quantize_q4_1(weights) -> np.ndarray:
    """float weights (a multiple of 32 of them) -> Q4_1 bytes, as llama.cpp's reference does.

    Per block: m = min(w), d = (max(w) - m) / 15, q = round((w - m) / d) clipped to 0..15.
    Example: 32 weights 0, 1, ..., 31 -> d = 31 / 15, m = 0: 20 bytes that decode to 0, 2.07, 4.13, ...
    """
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    if w.size == 0 or w.size % Q4_1_BLOCK:
        raise ValueError(f"Q4_1 quantises blocks of {Q4_1_BLOCK} weights; got {w.size} weights")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite (no nan/inf)")
    blocks = w.reshape(-1, Q4_1_BLOCK)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = (hi - lo) / 15
    inv_d = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)   # a constant block has d = 0
    q = np.clip(np.floor((blocks - lo) * inv_d + 0.5), 0, 15).astype(np.uint8)  # (n, 32)
    packed = q[:, :16] | (q[:, 16:] << 4)                          # low nibble: 0..15, high: 16..31
    header = np.concatenate([d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8)],
                            axis=1)                                 # (n, 4): d then m
    return np.concatenate([header, packed], axis=1).reshape(-1)


def gguf_tensor_summary(path) -> dict:
    """What is inside a GGUF file: per storage type, the tensors, weights and bytes.

    Returns {"file_bytes", "n_weights", "fp32_bytes", "bits_per_weight",
             "types": {type name: {"tensors", "weights", "bytes"}}, "metadata": {key: value}}
    (metadata: the short scalar fields, e.g. architecture, context length, layer count).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = gguf.GGUFReader(path)
    types: dict[str, dict[str, int]] = {}
    for t in reader.tensors:
        row = types.setdefault(t.tensor_type.name, {"tensors": 0, "weights": 0, "bytes": 0})
        row["tensors"] += 1
        row["weights"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith(("general.", "llama.")) and len(field.data) == 1:
            value = field.contents()
            if isinstance(value, (int, float, str)) and len(str(value)) < 80:
                metadata[key] = value
    n_weights = sum(r["weights"] for r in types.values())
    tensor_bytes = sum(r["bytes"] for r in types.values())
    return {"file_bytes": path.stat().st_size, "n_weights": n_weights, "fp32_bytes": 4 * n_weights,
            "bits_per_weight": 8 * tensor_bytes / n_weights, "types": types, "metadata": metadata}


def gguf_tensor(path, name: str):
    """(raw bytes as a uint8 array, type name, shape) of one tensor of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(Path(path))
    for t in reader.tensors:
        if t.name == name:
            return np.asarray(t.data).reshape(-1).view(np.uint8), t.tensor_type.name, tuple(
                int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first; torch order is reversed
    raise KeyError(f"no tensor {name!r} in {path}")


# ----------------------------------------------------------------------------------------------
# int8: from scratch, and torch's dynamic quantisation


def quantize_int8_symmetric(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 values, float scale) with x ~= values * scale, one scale per slice along `dim`.

    Symmetric: scale = max|x| / 127, so 0 maps to 0 exactly and values lie in -127..127.
    Example: [[-2.0, 0.0, 1.0, 2.0]] -> ([[-127, 0, 64, 127]], [[2 / 127]]).
    """
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (one scale per output row) and int8 activations computed on
    the fly: the idea behind dynamic quantisation, in plain torch.

    y = (x_q @ W_q^T) * (s_x * s_w) + b, where the product of int8 values is summed exactly
    (here in float32, which is exact for sums below 2**24; real kernels use int32 accumulators).
    activations="token": one activation scale per token (row of x); "tensor": one scale for the
    whole input, so a single outlier value coarsens the grid of every other token.
    """

    def __init__(self, linear: nn.Linear, activations: str = "token"):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear wraps an nn.Linear, got {type(linear).__name__}")
        check_choice("activations", activations, ("token", "tensor"))
        w_q, w_scale = quantize_int8_symmetric(linear.weight.detach(), dim=1)  # (out, in), (out, 1)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale.squeeze(1))                  # (out,)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activations = activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:                        # x: (..., in)
        if self.activations == "token":
            x_q, x_scale = quantize_int8_symmetric(x, dim=-1)                  # (..., in), (..., 1)
        else:
            x_q, x_scale = quantize_int8_symmetric(x.reshape(1, -1), dim=-1)   # one scale, (1, 1)
            x_q = x_q.reshape(x.shape)
        acc = x_q.float() @ self.w_q.float().T                                 # (..., out) integer sums
        y = acc * x_scale * self.w_scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={self.activations}"


def quantize_int8_dynamic(model: nn.Module, inplace: bool = False, backend: str = "torch",
                          skip=("lm_head",), activations: str = "token") -> nn.Module:
    """Every nn.Linear of `model` (except those named in `skip`) -> int8 weights, int8 activations.

    backend="torch": torch.ao.quantization.quantize_dynamic, torch's int8 kernels (fast; one
    activation scale per tensor; deprecated in recent torch, still present in 2.13).
    backend="scratch": Int8Linear above (per-token or per-tensor activation scales; it computes
    in float, so it shows the numerics, not the speed). skip: module names kept in float (the
    output layer, tied to the embedding table, by default).
    """
    check_choice("backend", backend, ("torch", "scratch"))
    check_choice("activations", activations, ("token", "tensor"))
    names = find_linear(model, skip)  # TypeError if model is not an nn.Module
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    if backend == "torch":
        try:
            from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
        except ImportError:  # a future torch without it: the from-scratch layer still works
            warnings.warn("torch.ao.quantization is not available in this torch; using the from-scratch "
                          "Int8Linear instead (same numerics idea, no int8 speed-up)", stacklevel=2)
            backend = "scratch"
    if backend == "torch":
        with warnings.catch_warnings():  # "torch.ao.quantization is deprecated": we know, see above
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8,
                                    inplace=True)
    return replace_linear(model, names, lambda linear: Int8Linear(linear, activations=activations))


@torch.no_grad()
def generation_speed(model, input_ids: torch.Tensor, new_tokens: int = 32, warmup: int = 2,
                     repeats: int = 3) -> float:
    """Greedy decoding speed in new tokens per second (batch of one, KV cache, forced length).

    The fastest of `repeats` timed runs: other programs can only slow a run down, never speed it
    up, so the best run is the least disturbed estimate (as `timeit` recommends).
    """
    check_positive_int("new_tokens", new_tokens)
    check_positive_int("warmup", warmup)
    check_positive_int("repeats", repeats)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(input_ids))
    model.generate(input_ids, max_new_tokens=warmup, min_new_tokens=warmup, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


@torch.no_grad()
def model_perplexity(model, token_ids, window: int = 256) -> float:
    """Perplexity of a causal LM on a text: exp(mean next-token loss) over non-overlapping windows of
    `token_ids` (lesson 05's `perplexity_from_loss`, applied to this model's loss on these ids).

    token_ids: 1-D ids of held-out text. Every window predicts its tokens 2..window from the ones
    before them inside the window (so the first tokens of each window see little context).
    Example: a model whose logits are always equal over 50 tokens -> 50.0 (a uniform guess).
    """
    ids = torch.as_tensor(token_ids).reshape(-1)
    if ids.numel() < 2:
        raise ValueError("token_ids needs at least 2 tokens")
    check_int("window", window, low=2)
    total_loss, total_count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window].unsqueeze(0)                # (1, <=window)
        if chunk.shape[1] < 2:
            break
        out = model(chunk)
        logits = out.logits if hasattr(out, "logits") else out      # HF models / plain modules
        loss = F.cross_entropy(logits[0, :-1].float(), chunk[0, 1:], reduction="sum")
        total_loss += loss.item()
        total_count += chunk.shape[1] - 1
    return float(np.exp(total_loss / total_count))


# ----------------------------------------------------------------------------------------------
# Memory bandwidth arithmetic


def bandwidth_bound_tokens_per_s(n_params: float, bits_per_weight: float, bandwidth_gb_s: float) -> float:
    """Upper bound on decoding speed: each new token reads all weights once from memory.

    tokens/s <= bandwidth (bytes/s) / model bytes, with model bytes = n_params * bits_per_weight / 8.
    (Ignores the KV cache reads and compute, which only make it slower.)
    Example: 7e9 weights at 4 bits (3.5 GB) and 100 GB/s -> 28.6 tokens/s at most.
    """
    for name, value in (("n_params", n_params), ("bits_per_weight", bits_per_weight),
                        ("bandwidth_gb_s", bandwidth_gb_s)):
        check_number(name, value, low=0, low_open=True)
    model_bytes = n_params * bits_per_weight / 8
    return bandwidth_gb_s * 1e9 / model_bytes


def measure_memory_bandwidth(megabytes: int = 128, repeats: int = 5) -> float:
    """This machine's memory bandwidth in GB/s: the best of `repeats` copies of a large array
    (a copy reads and writes every byte, so 2 x size moves per copy)."""
    check_int("megabytes", megabytes, low=16, what=" (bigger than the CPU caches)")
    check_positive_int("repeats", repeats)
    src = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9
