"""utils.quantization: blockwise 4/8-bit quantisation, its error bounds, and the de-quantising linear layer."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.quantization import (
    QuantizedLinear,
    dequantize_blockwise,
    linear_code,
    max_abs_error_bound,
    nf4_code,
    quantize_blockwise,
    quantize_model,
    weight_bytes_by_kind,
)

# The NF4 table as published with QLoRA (bitsandbytes, Dettmers et al. 2023): an outside reference.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def weights(seed=0, shape=(64, 96), outliers=True):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    if outliers:
        w[3, 5], w[40, 7] = 0.9, -1.3  # a few large values, as real weight matrices have
    return w


def test_nf4_code_is_the_published_table():
    code = nf4_code()
    assert code.shape == (16,)
    torch.testing.assert_close(code, torch.tensor(PUBLISHED_NF4), atol=2e-6, rtol=0)


def test_linear_codes():
    assert linear_code(8).shape == (255,) and linear_code(4).shape == (15,)
    assert linear_code(4)[0] == -1 and linear_code(4)[7] == 0 and linear_code(4)[-1] == 1
    assert linear_code(2).tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="bits"):
        linear_code(1)


@pytest.mark.parametrize("code", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("block_size", [32, 64])
def test_error_is_within_the_bound_of_every_block(code, block_size):
    w = weights()
    q = quantize_blockwise(w, code, block_size)
    back = dequantize_blockwise(q)
    assert back.shape == w.shape and back.dtype == torch.float32
    error = (w - back).abs().reshape(-1, block_size).amax(dim=1)
    assert torch.all(error <= max_abs_error_bound(q) + 1e-7)
    # each block's largest value is a code point (+-1 * absmax): stored exactly
    blocks, back_blocks = w.reshape(-1, block_size), back.reshape(-1, block_size)
    where = blocks.abs().argmax(dim=1)
    rows = torch.arange(len(blocks))
    torch.testing.assert_close(back_blocks[rows, where], blocks[rows, where], atol=1e-7, rtol=1e-6)


def test_more_bits_less_error_and_nf4_beats_int4_on_normal_weights():
    w = weights(outliers=False, shape=(256, 256))

    def rms(code):
        return ((w - dequantize_blockwise(quantize_blockwise(w, code))).pow(2).mean().sqrt() / w.std()).item()

    assert rms("int8") < 0.01
    assert rms("nf4") < 0.12
    assert rms("int8") < rms("nf4") < rms("int4")


def test_storage_size():
    w = weights(shape=(128, 64))
    q4, q8 = quantize_blockwise(w, "nf4", 64), quantize_blockwise(w, "int8", 64)
    n = w.numel()
    assert q4.codes.dtype == torch.uint8 and q4.codes.numel() == n // 2
    assert q4.nbytes() == n // 2 + 4 * n // 64  # 4 bits per weight + one float32 scale per 64
    assert q8.nbytes() == n + 4 * n // 64
    assert q4.nbytes() / (4 * n) < 0.16  # about 1/7 of float32


def test_zero_blocks_and_exact_values():
    w = torch.zeros(4, 32)
    w[1, :2] = torch.tensor([0.5, -0.5])
    back = dequantize_blockwise(quantize_blockwise(w, "nf4", 32))
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back, w)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="code"):
        quantize_blockwise(weights(), "fp3")
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(weights(), "nf4", block_size=7)
    with pytest.raises(TypeError, match="block_size"):
        quantize_blockwise(weights(), "nf4", block_size=64.0)
    with pytest.raises(ValueError, match="multiple"):
        quantize_blockwise(torch.randn(10, 10), "nf4", block_size=64)
    with pytest.raises(TypeError, match="floating"):
        quantize_blockwise(torch.ones(64, dtype=torch.long), "nf4")
    with pytest.raises(TypeError, match="floating"):
        quantize_blockwise([0.5] * 64, "nf4")
    with pytest.raises(TypeError):
        QuantizedLinear(nn.Conv1d(2, 2, 1))


def test_quantized_linear_forward_and_backward():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    nn.init.normal_(linear.weight, std=0.02)  # trained weights look roughly normal
    layer = QuantizedLinear(linear, "nf4", 64)
    assert not any(p.requires_grad for p in layer.parameters())
    assert not any(t.dtype == torch.float32 and t.numel() == 64 * 32 for t in layer.buffers())  # no float weight kept
    w = layer.dequantized_weight()
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias))
    exact = linear(x)
    assert ((y - exact).pow(2).mean() / exact.pow(2).mean()).sqrt() < 0.1  # close to the float layer
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w, linear.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)


def test_quantize_model_swaps_linears_and_shrinks_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 8))
    reference = model(ids).logits.detach()
    before = weight_bytes_by_kind(model)
    assert before["quantized linear"] == 0
    quantize_model(model, "nf4", 64)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("_proj",))}
    assert kinds == {"QuantizedLinear"}
    assert type(model.lm_head) is nn.Linear  # skipped: tied to the embedding
    after = weight_bytes_by_kind(model)
    linear_params = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # 2 layers of q, o, k, v, gate, up, down
    # 4 bits per weight + one float32 scale per block of 64 + each layer's 16-value float32 code book
    assert after["quantized linear"] == linear_params // 2 + 4 * linear_params // 64 + 14 * 16 * 4
    assert after["float parameters"] == before["float parameters"] - 4 * linear_params
    logits = model(ids).logits
    assert ((logits - reference).pow(2).mean() / reference.pow(2).mean()) < 0.05
    with pytest.raises(ValueError):
        quantize_model(model, "nope")


def _tiny_tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_quantize_model_keeps_tied_weights_tied_and_copies_float_parameters():
    model = _tiny_tied_llama()
    embedding = model.model.embed_tokens.weight
    old_pointer = embedding.data_ptr()
    quantize_model(model, "nf4", 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight is embedding  # still one parameter
    assert embedding.data_ptr() != old_pointer  # its data now lives in a fresh copy


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map of the process (Linux)")
def test_quantize_model_lets_a_memory_mapped_weight_file_go(tmp_path):
    from transformers import LlamaForCausalLM

    _tiny_tied_llama().save_pretrained(tmp_path)
    weights_file = str((tmp_path / "model.safetensors").resolve())

    def mapped():
        return weights_file in Path("/proc/self/maps").read_text()

    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert mapped(), "premise: transformers maps the safetensors file lazily (if not, this test is moot)"
    quantize_model(model, "nf4", 32)
    gc.collect()
    assert not mapped(), "a float parameter still refers to the mapped file"
