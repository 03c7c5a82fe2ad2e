"""utils.attention: parity with torch, the causal property, multi-head attention, the KV cache."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.attention import (
    CausalSelfAttention,
    KVCache,
    MultiHeadAttention,
    attention_weights,
    causal_mask,
    scaled_dot_product_attention,
    torch_attention,
)

TOL = 1e-5


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_sdpa(batch, causal):
    q, k, v = randn(*batch, 7, 16, seed=1), randn(*batch, 7, 16, seed=2), randn(*batch, 7, 16, seed=3)
    ours = scaled_dot_product_attention(q, k, v, causal=causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert ours.shape == theirs.shape == (*batch, 7, 16)
    assert (ours - theirs).abs().max() < TOL


@settings(max_examples=25, deadline=None)
@given(tq=st.integers(1, 9), extra=st.integers(0, 6), d=st.integers(1, 24), dv=st.integers(1, 12),
       causal=st.booleans(), seed=st.integers(0, 1000))
def test_matches_torch_for_any_shapes_including_a_kv_cache(tq, extra, d, dv, causal, seed):
    """Tq < Tk is the cached case: the causal triangle is aligned to the end (explicit mask for torch)."""
    tk = tq + extra
    q, k, v = randn(2, tq, d, seed=seed), randn(2, tk, d, seed=seed + 1), randn(2, tk, dv, seed=seed + 2)
    mask = causal_mask(tq, tk) if causal else None
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (scaled_dot_product_attention(q, k, v, causal=causal) - theirs).abs().max() < TOL
    assert (torch_attention(q, k, v, causal=causal) - theirs).abs().max() < TOL


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_explicit_masks_follow_torch_conventions(kind):
    q, k, v = randn(2, 3, 5, 8, seed=1), randn(2, 3, 6, 8, seed=2), randn(2, 3, 6, 8, seed=3)
    keep = randn(2, 1, 5, 6, seed=4) > -0.5  # True = may attend (torch's bool convention)
    keep[..., 0] = True  # every query sees at least one key
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (scaled_dot_product_attention(q, k, v, mask=mask) - theirs).abs().max() < TOL
    assert (torch_attention(q, k, v, mask=mask) - theirs).abs().max() < TOL
    both = F.scaled_dot_product_attention(q, k, v, attn_mask=keep & causal_mask(5, 6))
    assert (scaled_dot_product_attention(q, k, v, causal=True, mask=keep) - both).abs().max() < TOL


def test_causal_mask_shapes_and_alignment():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # 2 new queries after 3 cached tokens: they are positions 3 and 4
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True] * 5]
    with pytest.raises(ValueError, match="Tq <= Tk"):
        causal_mask(5, 3)


def test_weights_are_distributions_and_causal_weights_ignore_the_future():
    q, k = randn(4, 6, 8, seed=1), randn(4, 6, 8, seed=2)
    w = attention_weights(q, k, causal=True)
    assert torch.allclose(w.sum(-1), torch.ones(4, 6))
    assert (w.triu(diagonal=1) == 0).all()


def test_causal_output_does_not_depend_on_later_tokens():
    q, k, v = randn(1, 10, 8, seed=1), randn(1, 10, 8, seed=2), randn(1, 10, 8, seed=3)
    before = scaled_dot_product_attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 6:], v2[:, 6:] = randn(1, 4, 8, seed=9), randn(1, 4, 8, seed=10)
    after = scaled_dot_product_attention(q, k2, v2, causal=True)
    assert torch.equal(before[:, :6], after[:, :6])  # positions 0..5 never saw 6..9
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def _copy_into_torch_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(ours.n_embd, ours.n_head, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(ours.c_attn.weight)  # both stack [q; k; v] projections
        mha.in_proj_bias.copy_(ours.c_attn.bias)
        mha.out_proj.weight.copy_(ours.c_proj.weight)
        mha.out_proj.bias.copy_(ours.c_proj.bias)
    return mha.eval()


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_matches_nn_multihead_attention(causal):
    torch.manual_seed(0)
    ours = MultiHeadAttention(32, 4, causal=causal).eval()
    mha = _copy_into_torch_mha(ours)
    x = randn(3, 9, 32)
    # nn.MultiheadAttention's bool mask means the opposite: True = NOT allowed
    theirs, _ = mha(x, x, x, attn_mask=~causal_mask(9) if causal else None, need_weights=False)
    with torch.no_grad():
        assert (ours(x) - theirs).abs().max() < TOL


def test_course_and_torch_implementations_agree_in_the_module():
    torch.manual_seed(0)
    ours = CausalSelfAttention(24, 3).eval()
    fast = CausalSelfAttention(24, 3, impl="torch").eval()
    fast.load_state_dict(ours.state_dict())
    x = randn(2, 11, 24)
    with torch.no_grad():
        assert (ours(x) - fast(x)).abs().max() < TOL


@pytest.mark.parametrize("impl", ["course", "torch"])
def test_kv_cache_gives_the_same_outputs_as_the_full_sequence(impl):
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, impl=impl, layer_idx=1).eval()
    x = randn(2, 10, 16)
    cache = KVCache(n_layers=2)
    with torch.no_grad():
        full = attn(x)
        steps = [attn(x[:, :4], kv_cache=cache), attn(x[:, 4:7], kv_cache=cache)]
        steps += [attn(x[:, t:t + 1], kv_cache=cache) for t in range(7, 10)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < TOL
    assert cache.keys[1].shape == (2, 2, 10, 8) and cache.keys[0] is None


def test_kv_cache_bookkeeping():
    cache = KVCache(3)
    assert cache.length == 0
    k, v = randn(1, 2, 4, 8, seed=1), randn(1, 2, 4, 8, seed=2)
    for layer in range(3):
        k_all, v_all = cache.update(layer, k, v)
    assert cache.length == 4 and k_all is k
    k_all, v_all = cache.update(0, k[:, :, :1], v[:, :, :1])
    assert cache.length == 5 and k_all.shape == (1, 2, 5, 8) and torch.equal(v_all[:, :, :4], v)
    cache.crop(2)
    assert cache.length == 2 and cache.keys[2].shape == (1, 2, 2, 8)
    cache.reset()
    assert cache.length == 0 and cache.keys == [None, None, None]
    assert "length=0" in repr(cache)


def test_bad_input_says_what_is_wrong():
    q = randn(2, 5, 8)
    with pytest.raises(ValueError, match="same last dim"):
        scaled_dot_product_attention(q, randn(2, 5, 4), randn(2, 5, 4))
    with pytest.raises(ValueError, match="same number of positions"):
        scaled_dot_product_attention(q, randn(2, 5, 8), randn(2, 6, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., T, d\)"):
        scaled_dot_product_attention(randn(8), randn(8), randn(8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        scaled_dot_product_attention([[1.0]], q, q)
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, q, q, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        scaled_dot_product_attention(q, q[:, :2], q[:, :2], causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        MultiHeadAttention(32, 4, impl="flash")
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 32\)"):
        MultiHeadAttention(32, 4)(randn(2, 5, 16))
    with pytest.raises(ValueError, match="n_layers"):
        KVCache(0)
    cache = KVCache(2)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
        cache.update(2, randn(1, 1, 1, 4), randn(1, 1, 1, 4))
    cache.update(0, randn(1, 2, 3, 4), randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="do not match the cached keys"):
        cache.update(0, randn(2, 2, 1, 4), randn(2, 2, 1, 4))
