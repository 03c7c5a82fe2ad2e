"""utils.local_inference: Q4_1 blocks by hand, int8 layers, size/perplexity/bandwidth arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.local_inference import (
    Q4_1_BYTES,
    Int8Linear,
    bandwidth_bound_tokens_per_s,
    dequantize_q4_1,
    generation_speed,
    measure_memory_bandwidth,
    model_perplexity,
    quantize_int8_dynamic,
    quantize_int8_symmetric,
    quantize_q4_1,
)
from utils.model_surgery import weight_bytes


def hand_made_block(d: float, m: float, q: list[int]) -> np.ndarray:
    """One Q4_1 block written byte by byte: fp16 d, fp16 m, 16 bytes (low nibble q[j], high q[j+16])."""
    assert len(q) == 32 and all(0 <= v <= 15 for v in q)
    header = np.array([d, m], dtype="<f2").view(np.uint8)
    nibbles = np.array([q[j] | (q[j + 16] << 4) for j in range(16)], dtype=np.uint8)
    return np.concatenate([header, nibbles])


def test_dequantize_a_hand_made_block():
    q = list(range(16)) + list(range(15, -1, -1))  # 0..15 then 15..0
    block = hand_made_block(0.5, -1.0, q)
    assert block.size == Q4_1_BYTES == 20
    expected = 0.5 * np.array(q, dtype=np.float32) - 1.0  # w = d * q + m
    np.testing.assert_array_equal(dequantize_q4_1(block), expected)


def test_low_nibbles_are_the_first_half_of_the_block():
    q = [1] * 16 + [14] * 16
    w = dequantize_q4_1(hand_made_block(1.0, 0.0, q))
    assert (w[:16] == 1).all() and (w[16:] == 14).all()


def test_quantize_then_dequantize_is_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.normal(size=32 * 50).astype(np.float32)
    raw = quantize_q4_1(w)
    assert raw.dtype == np.uint8 and raw.size == 50 * Q4_1_BYTES
    back = dequantize_q4_1(raw)
    blocks = w.reshape(-1, 32)
    step = (blocks.max(1) - blocks.min(1)) / 15  # d of each block
    err = np.abs(back - w).reshape(-1, 32).max(1)
    assert (err <= step / 2 + 2e-3 * np.abs(blocks).max(1)).all()  # + fp16 rounding of d and m
    assert np.abs(back - w).mean() > 0  # 4 bits do lose information


def test_quantize_matches_the_gguf_library_byte_for_byte():
    import gguf
    rng = np.random.default_rng(1)
    w = rng.normal(scale=0.05, size=(4, 64)).astype(np.float32)
    theirs = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1).reshape(-1)
    np.testing.assert_array_equal(quantize_q4_1(w), theirs)
    np.testing.assert_array_equal(dequantize_q4_1(theirs),
                                  gguf.quants.dequantize(theirs.reshape(4, -1), gguf.GGMLQuantizationType.Q4_1)
                                  .reshape(-1))


def test_a_constant_block_round_trips():
    w = np.full(32, 0.25, dtype=np.float32)
    np.testing.assert_array_equal(dequantize_q4_1(quantize_q4_1(w)), w)


@pytest.mark.parametrize("bad, error", [(np.zeros(20, dtype=np.float32), TypeError),
                                        (np.zeros(21, dtype=np.uint8), ValueError)])
def test_dequantize_rejects_bad_input(bad, error):
    with pytest.raises(error):
        dequantize_q4_1(bad)


@pytest.mark.parametrize("bad", [np.zeros(31), np.array([np.nan] * 32), np.zeros(0)])
def test_quantize_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        quantize_q4_1(bad)


def test_int8_symmetric_quantisation():
    x = torch.tensor([[-2.0, 0.0, 1.0, 2.0]])
    q, scale = quantize_int8_symmetric(x)
    assert q.dtype == torch.int8 and q.tolist() == [[-127, 0, 64, 127]]
    assert torch.allclose(q.float() * scale, x, atol=scale.item() / 2)
    with pytest.raises(TypeError):
        quantize_int8_symmetric(torch.tensor([1, 2]))


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    q = Int8Linear(linear)
    assert q.w_q.dtype == torch.int8 and q.w_q.shape == (32, 64)
    rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < rel < 0.02
    with pytest.raises(TypeError):
        Int8Linear(nn.Conv1d(2, 2, 1))


def test_dynamic_quantisation_shrinks_the_linear_weights_and_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x = torch.randn(4, 256)
    quantized = quantize_int8_dynamic(model)
    assert quantized is not model  # a copy unless inplace=True
    before, after = weight_bytes(model), weight_bytes(quantized)
    assert 3.5 < before / after < 4.1  # int8 weights (+ float biases) vs float32
    rel = (quantized(x) - model(x)).norm() / model(x).norm()
    assert rel < 0.05
    with pytest.raises(TypeError):
        quantize_int8_dynamic("not a model")


def test_from_scratch_backend_and_skipped_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(3, 64)
    scratch = quantize_int8_dynamic(model, backend="scratch", skip=["2"])
    assert isinstance(scratch[0], Int8Linear) and isinstance(scratch[2], nn.Linear)
    assert (scratch(x) - model(x)).norm() / model(x).norm() < 0.02
    with pytest.raises(ValueError):
        quantize_int8_dynamic(model, backend="onnx")


def test_per_tensor_activation_scales_suffer_from_one_outlier():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    x[0, 0] = 500.0  # one outlier in one token, as LLM activations have
    exact = linear(x)[1:]
    per_token = Int8Linear(linear, activations="token")(x)[1:]
    per_tensor = Int8Linear(linear, activations="tensor")(x)[1:]
    assert (per_tensor - exact).norm() > 10 * (per_token - exact).norm()  # the other tokens pay
    with pytest.raises(ValueError):
        Int8Linear(linear, activations="channel")


class UniformLM(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


class BigramLM(nn.Module):
    """Always puts probability 1/2 on (previous token + 1) mod vocab, the rest spread evenly."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        p = torch.full((*ids.shape, self.vocab), 0.5 / (self.vocab - 1))
        p.scatter_(-1, ((ids + 1) % self.vocab)[..., None], 0.5)
        return p.log()


def test_model_perplexity_of_known_models():
    assert math.isclose(model_perplexity(UniformLM(50), torch.arange(40) % 50, window=16), 50, rel_tol=1e-5)
    # a counting text: every next token is the predicted one, p = 1/2 -> perplexity 2
    assert math.isclose(model_perplexity(BigramLM(10), torch.arange(40) % 10, window=16), 2, rel_tol=1e-5)
    with pytest.raises(ValueError):
        model_perplexity(UniformLM(5), torch.tensor([1]))
    with pytest.raises(ValueError):
        model_perplexity(UniformLM(5), torch.arange(5), window=1)
    with pytest.raises(TypeError):
        model_perplexity(UniformLM(5), torch.arange(5), window=2.0)


def test_bandwidth_bound_arithmetic():
    # 7B weights at 4 bits = 3.5 GB; 100 GB/s reads them 28.6 times per second
    assert math.isclose(bandwidth_bound_tokens_per_s(7e9, 4, 100), 100 / 3.5)
    assert math.isclose(bandwidth_bound_tokens_per_s(7e9, 16, 100), 100 / 14)
    for bad in ({"n_params": 0}, {"bits_per_weight": -4}, {"bandwidth_gb_s": float("nan")}):
        kwargs = {"n_params": 7e9, "bits_per_weight": 4, "bandwidth_gb_s": 100, **bad}
        with pytest.raises(ValueError):
            bandwidth_bound_tokens_per_s(**kwargs)
    with pytest.raises(TypeError):
        bandwidth_bound_tokens_per_s("7B", 4, 100)


def test_memory_bandwidth_refuses_a_buffer_that_fits_in_the_cpu_caches():
    with pytest.raises(ValueError, match="megabytes"):
        measure_memory_bandwidth(megabytes=1)
    with pytest.raises(ValueError, match="repeats"):
        measure_memory_bandwidth(repeats=0)


def test_generation_speed_rejects_bad_counts():
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="repeats"):
        generation_speed(None, ids, new_tokens=4, repeats=0)
    with pytest.raises(ValueError, match="new_tokens"):
        generation_speed(None, ids, new_tokens=0)
