"""utils.sampling: the sampling rules, bad input, and generate() with and without a KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from utils.gpt import GPT, GPTConfig
from utils.sampling import (
    apply_repetition_penalty,
    generate,
    next_token_probs,
    sample_next_token,
    stream_tokens,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0],
                       [0.0, 0.1, 3.0, 0.2, 2.9, -1.0]])


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False)).eval()


def test_greedy_settings_all_pick_the_argmax():
    greedy = torch.tensor([0, 2])
    g = torch.Generator().manual_seed(0)
    for kwargs in ({"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}, {"temperature": 5.0, "top_k": 1},
                   {"temperature": 1.0, "top_p": 0.01}):
        for _ in range(20):
            assert torch.equal(sample_next_token(LOGITS, generator=g, **kwargs), greedy), kwargs


def test_empirical_frequencies_match_the_softmax():
    n = 40_000
    g = torch.Generator().manual_seed(1)
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(LOGITS[0] / temperature, dim=-1)
        draws = sample_next_token(LOGITS[:1].expand(n, -1), temperature=temperature, generator=g)
        counts = torch.bincount(draws, minlength=6).double()
        expected_counts = expected.double() * n
        keep = expected_counts > 5  # chi-square needs expected counts that are not tiny
        chi2 = float((((counts - expected_counts) ** 2) / expected_counts)[keep].sum())
        dof = int(keep.sum()) - 1
        # 99.9th percentile of chi-square: ~ dof + 3.1 * sqrt(2 dof) + 6 (loose for small dof)
        assert chi2 < dof + 3.1 * math.sqrt(2 * dof) + 6, (temperature, chi2)
        assert int(counts[~keep].sum()) <= 5


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.softmax(LOGITS[0], dim=-1)  # 0.561, 0.206, 0.125, 0.076, 0.028, 0.004
    p = next_token_probs(LOGITS[:1], top_k=2)[0]
    assert (p[:2] > 0).all() and (p[2:] == 0).all()
    assert torch.allclose(p[:2], probs[:2] / probs[:2].sum())
    # the nucleus for top_p=0.75: the first token (0.561) is not enough, the first two (0.767) are
    p = next_token_probs(LOGITS[:1], top_p=0.75)[0]
    assert (p[:2] > 0).all() and (p[2:] == 0).all()
    p = next_token_probs(LOGITS[:1], top_p=float(probs[0]) + 1e-4)[0]
    assert (p > 0).sum() == 2
    torch.testing.assert_close(next_token_probs(LOGITS, top_p=1.0), torch.softmax(LOGITS, -1), rtol=1e-6, atol=1e-7)
    # sampling only ever returns kept tokens
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(LOGITS[:1].expand(5000, -1), top_k=3, generator=g)
    assert set(draws.tolist()) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    entropy = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum())
    h = [entropy(next_token_probs(LOGITS[:1], temperature=t)[0]) for t in (0.25, 1.0, 4.0)]
    assert h[0] < h[1] < h[2] < math.log(6)
    assert torch.equal(next_token_probs(LOGITS, temperature=0), torch.nn.functional.one_hot(
        LOGITS.argmax(-1), 6).float())


def test_seeded_generator_makes_sampling_reproducible():
    draw = lambda seed: sample_next_token(LOGITS.repeat(50, 1), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, "top_k must be None"),
    ({"top_k": -3}, "top_k must be None"),
])
def test_bad_sampling_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next_token(LOGITS, **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(torch.nn.Identity(), torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


def test_bad_types_and_shapes_raise():
    with pytest.raises(TypeError, match="top_k"):
        sample_next_token(LOGITS, top_k=2.5)
    with pytest.raises(ValueError, match="shape \\(batch, vocab\\)"):
        sample_next_token(LOGITS[0])
    with pytest.raises(ValueError, match="repetition_penalty"):
        apply_repetition_penalty(LOGITS, torch.tensor([[0], [1]]), 0.0)


def test_repetition_penalty_lowers_seen_tokens_only():
    out = apply_repetition_penalty(LOGITS, torch.tensor([[0, 5], [2, 2]]), 2.0)
    assert out[0, 0] == 1.0 and out[0, 5] == -6.0 and out[1, 2] == 1.5
    mask = torch.ones_like(LOGITS, dtype=torch.bool)
    mask[0, 0] = mask[0, 5] = mask[1, 2] = False
    assert torch.equal(out[mask], LOGITS[mask])


def test_cache_gives_the_same_tokens_as_no_cache(gpt):
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0))
    for kwargs in ({}, {"temperature": 1.0, "top_k": 10}, {"temperature": 0.8, "top_p": 0.9},
                   {"repetition_penalty": 1.3}):
        outs = [generate(gpt, prompt, 20, use_cache=cache, generator=torch.Generator().manual_seed(3), **kwargs)
                for cache in (True, False)]
        assert outs[0].shape == (3, 25)
        assert torch.equal(outs[0], outs[1]), kwargs
        assert torch.equal(outs[0][:, :5], prompt)


def test_the_cached_logits_match_the_full_forward(gpt):
    from utils.attention import KVCache

    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    full = gpt(ids)
    cache = KVCache(gpt.config.n_layer)
    steps = [gpt(ids[:, :4], kv_cache=cache)] + [gpt(ids[:, t:t + 1], kv_cache=cache) for t in range(4, 12)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_context_window_limit_and_sliding_window(gpt):
    prompt = torch.zeros(1, 30, dtype=torch.long)
    with pytest.raises(ValueError, match="context window"):
        generate(gpt, prompt, 5)
    assert generate(gpt, prompt, 3).shape == (1, 33)  # 30 + 3 - 1 = 32 positions: just fits
    a = generate(gpt, prompt, 20, sliding_window=True)
    b = generate(gpt, prompt, 20, sliding_window=True, use_cache=False)
    assert a.shape == (1, 50) and torch.equal(a, b)


def test_stop_tokens_end_rows_and_pad_the_rest(gpt):
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(2))
    free = generate(gpt, prompt, 15)
    stop = int(free[0, 6])  # a token row 0 produces at its third step
    out = generate(gpt, prompt, 15, eos_token_id=[stop], pad_token_id=49)
    first = (free[0, 4:] == stop).nonzero()[0].item() + 4
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    if out.shape[1] > first + 1:
        assert (out[0, first + 1:] == 49).all()
    streamed = list(stream_tokens(gpt, prompt, 15))
    assert torch.equal(torch.stack(streamed, 1), free[:, 4:])


def test_one_dimensional_input_gives_one_dimensional_output(gpt):
    out = generate(gpt, torch.tensor([1, 2, 3]), 4)
    assert out.shape == (7,) and out[:3].tolist() == [1, 2, 3]
    assert torch.equal(generate(gpt, torch.tensor([1, 2, 3]), 0), torch.tensor([1, 2, 3]))


@pytest.fixture(scope="module")
def smollm2():
    from utils.models import load_chat_model

    return load_chat_model()


@pytest.mark.slow
def test_greedy_matches_hf_generate_on_smollm2(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    ours = generate(model, ids, 24, eos_token_id=tok.eos_token_id)
    ours_uncached = generate(model, ids, 24, eos_token_id=tok.eos_token_id, use_cache=False)
    with torch.inference_mode():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    assert torch.equal(ours, theirs), (tok.decode(ours[0]), tok.decode(theirs[0]))
    assert torch.equal(ours_uncached, ours)


@pytest.mark.slow
def test_hf_model_sampling_with_cache_equals_without(smollm2):
    model, tok = smollm2
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    outs = [generate(model, ids, 12, temperature=0.9, top_p=0.95, use_cache=c,
                     generator=torch.Generator().manual_seed(0)) for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_a_tiny_temperature_is_greedy_not_nan():
    """Dividing logits by 1e-40 overflows to inf; subtracting the max first keeps it finite."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [50.0, -50.0, 49.0]])
    for temperature in (1e-40, 1e-30, 5e-324):
        probs = next_token_probs(logits, temperature=temperature)
        assert not probs.isnan().any()
        assert probs.argmax(-1).tolist() == [1, 0] and probs.max(-1).values.tolist() == [1.0, 1.0]
        assert sample_next_token(logits, temperature=temperature).tolist() == [1, 0]
