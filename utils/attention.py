"""Attention from scratch: scaled dot-product attention, the causal mask, multi-head attention
and the KV cache (lesson 03; the GPT and Llama models in `utils.gpt` are built on it).

Shapes: B batch, H heads, T time (sequence length), d (or head_dim) the size of one head,
C = H * d the model width. A query at position i attends to keys 0..i (causal) or to all keys.

* `scaled_dot_product_attention(q, k, v, causal=False, mask=None)`: softmax(q k^T / sqrt(d)) v,
  the same result as `torch.nn.functional.scaled_dot_product_attention` (tests check it to 1e-5).
* `attention_weights(q, k, causal=False, mask=None)`: just the softmax part, to look at.
* `causal_mask(Tq, Tk)`: which keys each query may see; aligned to the END when Tq < Tk
  (the KV-cache case: the Tq new queries are the last Tq positions of the Tk keys).
* `MultiHeadAttention` / `CausalSelfAttention`: the nn.Module a GPT block uses.
* `KVCache`: the keys and values of tokens already processed, one entry per layer, so that
  generating token t+1 costs one new query instead of re-running the whole prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checks import check_positive_int


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., T, d) with at least 2 dims, "
                             f"got shape {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dim d (q·k is a dot product), got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of positions T (one value per key), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")


def causal_mask(Tq: int, Tk: int | None = None, device=None) -> torch.Tensor:
    """Bool (Tq, Tk): True where query i may attend to key j, i.e. j <= i + (Tk - Tq).

    With Tq == Tk this is the lower triangle. With Tq < Tk (a KV cache holds Tk - Tq earlier
    tokens) the queries are the LAST Tq positions, so the triangle is aligned to the end.

    Shown in lesson 03.
    """
    Tk = Tq if Tk is None else Tk
    if Tq < 1 or Tk < 1:
        raise ValueError(f"Tq and Tk must be >= 1, got Tq={Tq}, Tk={Tk}")
    if Tq > Tk:
        raise ValueError(f"a causal mask needs Tq <= Tk (queries are the last Tq of the Tk "
                         f"positions), got Tq={Tq} > Tk={Tk}")
    i = torch.arange(Tq, device=device).unsqueeze(1)  # (Tq, 1)
    j = torch.arange(Tk, device=device).unsqueeze(0)  # (1, Tk)
    return j <= i + (Tk - Tq)


def attention_weights(q, k, causal: bool = False, mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) with optional masks: (..., Tq, d), (..., Tk, d) -> (..., Tq, Tk).

    `mask` follows torch's convention: a bool tensor (True = may attend) or a float tensor added
    to the scores (0 = keep, -inf = block); it must broadcast to (..., Tq, Tk).

    Shown in lesson 03.
    """
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., Tq, Tk); /sqrt(d) keeps the variance ~1
    if causal:
        allowed = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor (bool or float), got {type(mask).__name__}")
        try:
            torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the "
                             f"attention scores {tuple(scores.shape)} (..., Tq, Tk)") from None
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    # each row sums to 1 over the keys
    return torch.softmax(scores, dim=-1)


def scaled_dot_product_attention(q, k, v, causal: bool = False, mask=None,
                                 dropout_p: float = 0.0) -> torch.Tensor:
    """Attention(q, k, v) = softmax(q k^T / sqrt(d)) v.

    q: (..., Tq, d), k: (..., Tk, d), v: (..., Tk, dv) -> (..., Tq, dv).
    causal=True lets query i see keys j <= i + (Tk - Tq) (see `causal_mask`).
    dropout_p drops attention weights (training only: pass 0.0 in eval, as torch's function does).

    Shown in lesson 03.
    """
    check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    weights = attention_weights(q, k, causal=causal, mask=mask)  # (..., Tq, Tk)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    # (..., Tq, dv): each output is a weighted average of the values
    return weights @ v


def torch_attention(q, k, v, causal: bool = False, mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """The same as `scaled_dot_product_attention`, computed by torch's fused kernel (faster, and
    it never stores the (Tq, Tk) weights). torch's `is_causal` aligns the triangle to the START
    when Tq != Tk, so for the KV-cache case the end-aligned mask is passed explicitly."""
    check_qkv(q, k, v)
    Tq, Tk = q.shape[-2], k.shape[-2]
    if causal and (Tq != Tk or mask is not None):
        allowed = causal_mask(Tq, Tk, device=q.device)
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal)


ATTENTION_IMPLS = {"course": scaled_dot_product_attention, "torch": torch_attention}


class KVCache:
    """Keys and values of the tokens seen so far, for each layer.

    `update(layer, k, v)` appends the new keys/values (B, H, T_new, d) along the time axis and
    returns everything cached for that layer, (B, H, T_past + T_new, d). A model reads `length`
    once at the start of its forward pass (to know the positions of the new tokens), then every
    layer calls `update` once.
    """

    def __init__(self, n_layers: int):
        self.n_layers = check_positive_int("n_layers", n_layers)
        self.reset()

    def reset(self) -> None:
        self.keys: list[torch.Tensor | None] = [None] * self.n_layers
        self.values: list[torch.Tensor | None] = [None] * self.n_layers

    @property
    def length(self) -> int:
        """Number of tokens cached so far (in layer 0, which a forward pass updates first)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        if k.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"k and v must match in (B, H, T), got {tuple(k.shape)} and {tuple(v.shape)}")
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            past = self.keys[layer]
            if past.shape[:-2] != k.shape[:-2] or past.shape[-1] != k.shape[-1]:
                raise ValueError(f"new keys {tuple(k.shape)} do not match the cached keys "
                                 f"{tuple(past.shape)} (same batch, heads and head size needed)")
            self.keys[layer] = torch.cat([past, k], dim=-2)  # (B, H, T_past + T_new, d)
            self.values[layer] = torch.cat([self.values[layer], v], dim=-2)
        return self.keys[layer], self.values[layer]

    def crop(self, length: int) -> None:
        """Keep only the first `length` cached tokens (e.g. to undo a speculative step)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length must be in [0, {self.length}], got {length}")
        for i in range(self.n_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][..., :length, :]
                self.values[i] = self.values[i][..., :length, :]
                if length == 0:
                    self.keys[i] = self.values[i] = None

    def __repr__(self) -> str:
        return f"KVCache(n_layers={self.n_layers}, length={self.length})"


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d): each head gets its own slice of the channels. Shown in lesson 03."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d): concatenate the heads' outputs again. Shown in lesson 03."""
    B, H, T, d = x.shape
    return x.transpose(1, 2).contiguous().view(B, T, H * d)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention: project x to q, k, v, attend in n_head heads, project back.

    One fused Linear makes q, k and v (as nanoGPT's `c_attn` and nn.MultiheadAttention's
    `in_proj_weight` do); `c_proj` mixes the heads' outputs. `layer_idx` says which slot of a
    KVCache this module uses. impl="course" attends with this module's own
    `scaled_dot_product_attention`, impl="torch" with torch's fused kernel (same numbers to
    ~1e-6, faster to train).

    Shown in lesson 03.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 causal: bool = False, layer_idx: int = 0, impl: str = "course"):
        super().__init__()
        check_positive_int("n_embd", n_embd)
        check_positive_int("n_head", n_head)
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}): each head "
                             f"gets n_embd // n_head channels")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {sorted(ATTENTION_IMPLS)}, got {impl!r}")
        self.impl = impl
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, n_embd // n_head
        self.causal, self.dropout, self.layer_idx = causal, dropout, layer_idx
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # x -> [q | k | v]
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, mask=None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x must have shape (B, T, {self.n_embd}), got {tuple(x.shape)}")
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # 3 x (B, H, T, d)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H, T_past + T, d)
        attend = ATTENTION_IMPLS[self.impl]
        y = attend(q, k, v, causal=self.causal, mask=mask,
                   dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, d)
        y = self.c_proj(merge_heads(y))  # (B, T, C): mix the heads
        return self.resid_dropout(y)


class CausalSelfAttention(MultiHeadAttention):
    """MultiHeadAttention with the causal mask: position i sees only positions <= i (GPT)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 layer_idx: int = 0, impl: str = "course"):
        super().__init__(n_embd, n_head, bias=bias, dropout=dropout, causal=True,
                         layer_idx=layer_idx, impl=impl)
