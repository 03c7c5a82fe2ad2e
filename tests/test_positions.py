"""utils.positions: learned, sinusoidal and rotary (RoPE) positional information."""

from __future__ import annotations

import math

import pytest
import torch

from utils.positions import LearnedPositions, apply_rope, rope_frequencies, rotate_half, sinusoidal_positions


def test_sinusoidal_values_follow_the_formula():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16) and pe.dtype == torch.float32
    for t, i in [(0, 0), (7, 3), (49, 7)]:
        angle = t / 10000 ** (2 * i / 16)
        assert pe[t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_shift_is_one_linear_map_for_every_position():
    # PE(t + k) = PE(t) @ M_k with the same M_k for every t: a block-diagonal rotation.
    d, k = 16, 5
    pe = sinusoidal_positions(100 + k, d).double()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    M = torch.zeros(d, d, dtype=torch.float64)
    for i, w in enumerate(inv_freq):
        c, s = math.cos(k * w), math.sin(k * w)
        # (sin a, cos a) -> (sin(a+kw), cos(a+kw)) = (sin a c + cos a s, cos a c - sin a s)
        M[2 * i, 2 * i], M[2 * i + 1, 2 * i] = c, s
        M[2 * i, 2 * i + 1], M[2 * i + 1, 2 * i + 1] = -s, c
    assert torch.allclose(pe[:100] @ M, pe[k:], atol=1e-5)


def test_learned_positions_shape_and_limit():
    table = LearnedPositions(8, 4)
    assert table(8).shape == (8, 4)
    assert table.table.weight.requires_grad
    with pytest.raises(ValueError, match="table's length"):
        table(9)


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, T = 64, 12
    config = LlamaConfig(hidden_size=head_dim * 9, num_attention_heads=9, rope_theta=100000.0,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, T, head_dim), torch.randn(2, 9, T, head_dim)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, torch.arange(T)[None])  # (1, T, hd)
    cos, sin = rope_frequencies(head_dim, T, base=100000.0)
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    assert torch.equal(apply_rope(q, cos, sin), hf_q)
    assert torch.equal(apply_rope(k, hf_cos, hf_sin), hf_k)  # (B, T, hd) tables work too


def test_rope_start_offset_serves_a_kv_cache():
    cos, sin = rope_frequencies(8, 10)
    cos_late, sin_late = rope_frequencies(8, 4, start=6)
    assert torch.equal(cos[6:], cos_late) and torch.equal(sin[6:], sin_late)


def test_rope_keeps_norms_and_dot_products_depend_only_on_offset():
    torch.manual_seed(1)
    hd, T = 32, 40
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)
    cos, sin = rope_frequencies(hd, T)
    qs = apply_rope(q.expand(1, 1, T, hd), cos, sin)[0, 0].double()  # the same q at every position
    ks = apply_rope(k.expand(1, 1, T, hd), cos, sin)[0, 0].double()
    assert torch.allclose(qs.norm(dim=-1), q.norm().double().expand(T), atol=1e-5)
    scores = qs @ ks.T  # (T, T): score[m, n] for query at m, key at n
    for offset in (0, 3, 17):
        diagonal = torch.diagonal(scores, offset=-offset)  # all pairs with m - n = offset
        assert diagonal.max() - diagonal.min() < 1e-4
    assert abs(scores[5, 2] - scores[5, 0]) > 1e-3  # and different offsets give different scores


def test_rotate_half_is_a_quarter_turn():
    x = torch.arange(4.0)
    assert rotate_half(x).tolist() == [-2.0, -3.0, 0.0, 1.0]
    assert torch.equal(rotate_half(rotate_half(x)), -x)


@pytest.mark.parametrize("call, message", [
    (lambda: sinusoidal_positions(0, 8), "T must be a positive int"),
    (lambda: sinusoidal_positions(4, 7), "d must be even"),
    (lambda: rope_frequencies(7, 4), "head_dim must be even"),
    (lambda: rope_frequencies(8, 4, start=-1), "start must be an int >= 0"),
    (lambda: LearnedPositions(0, 4), "max_len must be a positive int"),
    (lambda: apply_rope(torch.zeros(2, 4, 8), *rope_frequencies(8, 2)), "must be"),
    (lambda: apply_rope(torch.zeros(1, 1, 3, 8), *rope_frequencies(8, 2)), "cos and sin must be"),
])
def test_bad_input_says_what_is_allowed(call, message):
    with pytest.raises(ValueError, match=message):
        call()
