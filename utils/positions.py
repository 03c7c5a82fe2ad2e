"""Where is each token? Three ways to give a transformer positional information (lesson 02).

Attention on its own is blind to order: shuffle the tokens and every token's output is shuffled
the same way. A model therefore mixes position into the vectors:

* `LearnedPositions`: a second lookup table, one trained vector per position (GPT-2). Simple, but
  it knows nothing about positions it never saw in training.
* `sinusoidal_positions(T, d)`: fixed sines and cosines of geometrically spaced frequencies, added
  to the token embeddings (the original transformer). PE(t + k) is a rotation of PE(t), so a
  linear layer can read relative offsets.
* RoPE, `rope_frequencies` + `apply_rope`: rotate each query and key vector by an angle that grows
  with its position (Llama, SmolLM2). The dot product of a rotated query and key then depends only
  on their relative offset. The layout here is the "rotate_half" convention of transformers'
  Llama: dimension i is paired with dimension i + head_dim/2 (not with its neighbour i + 1), so
  the course's Llama (utils.gpt) can load SmolLM2's weights unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from utils.checks import check_int, check_positive_int


def check_even_dim(name: str, value) -> None:
    """A positive even int: sin/cos and RoPE use dimensions in pairs. Example: check_even_dim("d", 64)."""
    check_positive_int(name, value)
    if value % 2:
        raise ValueError(f"{name} must be even (dimensions are used in sin/cos pairs), got {value}")


class LearnedPositions(nn.Module):
    """A trainable (max_len, d) table: position t gets row t, like a token embedding."""

    def __init__(self, max_len: int, d: int):
        super().__init__()
        check_positive_int("max_len", max_len)
        check_positive_int("d", d)
        self.table = nn.Embedding(max_len, d)
        nn.init.normal_(self.table.weight, std=0.02)  # GPT-2's initialisation

    def forward(self, T: int) -> torch.Tensor:  # -> (T, d)
        if not isinstance(T, int) or not 1 <= T <= self.table.num_embeddings:
            raise ValueError(f"T must be an int in [1, {self.table.num_embeddings}] (the table's "
                             f"length), got {T!r}: a learned table has no rows for later positions")
        return self.table(torch.arange(T, device=self.table.weight.device))


def sinusoidal_positions(T: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed (T, d) encoding of "Attention is all you need".

    PE[t, 2i] = sin(t / base^(2i/d)),  PE[t, 2i+1] = cos(t / base^(2i/d)).

    Shown in lesson 02.
    """
    check_positive_int("T", T)
    check_even_dim("d", d)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]    # (T, d/2)
    pe = torch.empty(T, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)  # even dims: sine
    pe[:, 1::2] = torch.cos(angles)  # odd dims: cosine of the same angle
    return pe.float()


def rope_frequencies(head_dim: int, T: int, base: float = 10000.0, start: int = 0):
    """cos and sin tables for RoPE, each (T, head_dim), for positions start .. start+T-1.

    Computed as transformers' LlamaRotaryEmbedding does (float32, frequencies repeated for the two
    halves), so results match the HF model bit for bit. `start` > 0 serves a KV cache, where new
    tokens sit after the cached ones.

    Shown in lesson 02.
    """
    check_even_dim("head_dim", head_dim)
    check_positive_int("T", T)
    check_int("start", start, low=0)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (hd/2,)
    positions = torch.arange(start, start + T, dtype=torch.float)                            # (T,)
    freqs = positions[:, None] * inv_freq[None, :]                                           # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd): dim i and dim i + hd/2 share an angle
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90-degree turn per pair.

    Shown in lesson 02.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, H, T, head_dim) by their positions' angles.

    cos, sin: (T, head_dim) from rope_frequencies, or (B, T, head_dim) for per-sequence positions.
    Each pair (x[i], x[i + hd/2]) is rotated by the angle of its frequency times the position.

    Shown in lesson 02.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, T, head_dim), got shape {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"cos and sin must be (T, head_dim) = {tuple(x.shape[-2:])} (or with a "
                         f"leading batch dim), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() == 3:  # (B, T, hd) -> (B, 1, T, hd): the same angles for every head
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
