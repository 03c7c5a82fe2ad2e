"""utils.gpt: the nanoGPT-style GPT and the Llama that loads SmolLM2 (logits parity with HF)."""

import pytest
import torch
import torch.nn.functional as F

from utils.attention import KVCache
from utils.gpt import (
    GPT,
    GPTConfig,
    Llama,
    LlamaConfig,
    count_gpt_parameters,
    count_llama_parameters,
)
from utils.models import load_chat_model

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who",
           "Photosynthesis converts light energy into"]


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def ids(*shape, vocab=97, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def smollm2():
    """The real model (HF) and the course's copy of it, loaded once for the module."""
    hf_model, tokenizer = load_chat_model()
    return hf_model, tokenizer, Llama.from_hf(hf_model)


# ---------------------------------------------------------------- GPT

def test_gpt_shapes_tying_and_parameter_formula():
    for overrides in ({}, {"bias": False}, {"pre_ln": False}, {"n_layer": 3, "n_embd": 48}):
        model = tiny_gpt(**overrides)
        logits = model(ids(3, 10))
        assert logits.shape == (3, 10, 97)
        assert model.lm_head.weight is model.transformer.wte.weight  # tied
        assert model.num_parameters() == count_gpt_parameters(model.config)
        assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - 32 * model.config.n_embd


@pytest.mark.parametrize("pre_ln", [True, False])
def test_gpt_is_causal(pre_ln):
    model = tiny_gpt(pre_ln=pre_ln)
    x = ids(2, 12)
    y = x.clone()
    y[:, 8:] = ids(2, 4, seed=1)
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[:, :8] - b[:, :8]).abs().max() < 1e-5  # earlier positions never see later tokens
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_gpt_attention_implementations_agree():
    ours, fast = tiny_gpt(attn_impl="course"), tiny_gpt(attn_impl="torch")
    fast.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (ours(ids(2, 20)) - fast(ids(2, 20))).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["course", "torch"])
def test_gpt_kv_cache_equals_full_forward(impl):
    model = tiny_gpt(attn_impl=impl)
    x = ids(2, 20)
    cache = KVCache(model.config.n_layer)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :9], kv_cache=cache), model(x[:, 9:12], kv_cache=cache)]
        parts += [model(x[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
    assert cache.length == 20
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_gpt_learns_a_tiny_task():
    """A few steps on a fixed batch must lower the loss: gradients flow through every part."""
    model = tiny_gpt(dropout=0.1).train()
    x = ids(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gpt_bad_input_says_what_is_wrong():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="exceeds the model's context.*32 tokens"):
        model(ids(1, 33))
    cache = KVCache(2)
    model(ids(1, 30), kv_cache=cache)
    with pytest.raises(ValueError, match="30 cached \\+ 3 new = 33"):
        model(ids(1, 3), kv_cache=cache)
    with pytest.raises(ValueError, match=r"\(batch, time\)"):
        model(ids(10))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="kv_cache has 3 layers"):
        model(ids(1, 3), kv_cache=KVCache(3))
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        GPTConfig(block_size=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(TINY)


# ---------------------------------------------------------------- Llama

def tiny_llama(**overrides) -> Llama:
    torch.manual_seed(0)
    config = dict(vocab_size=97, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, n_hidden=64)
    return Llama(LlamaConfig(**{**config, **overrides})).eval()


def test_llama_gqa_shapes_and_parameter_formula():
    model = tiny_llama()
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (6 * 8, 48)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 8, 48)  # 2 kv heads only
    cache = KVCache(2)
    with torch.no_grad():
        assert model(ids(3, 5), kv_cache=cache).shape == (3, 5, 97)
    assert cache.keys[0].shape == (3, 2, 5, 8)  # the cache holds n_kv_head heads
    for m in (model, tiny_llama(tie_embeddings=False), tiny_llama(n_kv_head=6), tiny_llama(head_dim=12)):
        assert m.num_parameters() == count_llama_parameters(m.config)


def test_llama_is_causal_and_its_cache_equals_the_full_forward():
    model = tiny_llama()
    x = ids(2, 15)
    cache = KVCache(2)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :6], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(6, 15)]
        y = x.clone()
        y[:, 10:] = 0
        changed = model(y)
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5
    assert (changed[:, :10] - full[:, :10]).abs().max() < 1e-5


def test_llama_config_bad_input():
    with pytest.raises(ValueError, match=r"n_head \(6\) must be a multiple of n_kv_head \(4\)"):
        LlamaConfig(n_head=6, n_kv_head=4, n_embd=48)
    with pytest.raises(ValueError, match="head_dim must be even"):
        LlamaConfig(n_head=2, n_kv_head=1, n_embd=10)
    with pytest.raises(ValueError, match=r"n_embd \(50\) must be divisible by n_head \(3\)"):
        LlamaConfig(n_head=3, n_kv_head=1, n_embd=50)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_llama()(ids(1, 65))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        Llama.from_hf("SmolLM2")


@pytest.mark.slow
def test_from_hf_matches_transformers_logits(smollm2):
    hf_model, tokenizer, ours = smollm2
    assert ours.num_parameters() == sum(p.numel() for p in hf_model.parameters()) == 134_515_008
    assert count_llama_parameters(ours.config) == 134_515_008
    assert ours.lm_head.weight is ours.embed_tokens.weight
    worst = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            x = tokenizer(prompt, return_tensors="pt").input_ids
            diff = (ours(x) - hf_model(x).logits).abs().max().item()
            worst = max(worst, diff)
    assert worst < 1e-3, f"max |logit difference| = {worst:.2e}"


@pytest.mark.slow
def test_from_hf_copies_by_default_and_shares_on_request(smollm2):
    hf_model, tokenizer, ours = smollm2
    hf_ptr = hf_model.model.layers[3].mlp.up_proj.weight.data_ptr()
    assert ours.layers[3].mlp.up_proj.weight.data_ptr() != hf_ptr
    shared = Llama.from_hf(hf_model, copy=False)
    assert shared.layers[3].mlp.up_proj.weight.data_ptr() == hf_ptr
    assert shared.lm_head.weight is shared.embed_tokens.weight
    x = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(shared(x), ours(x))


@pytest.mark.slow
def test_from_hf_greedy_continuation_and_cache_match_transformers(smollm2):
    hf_model, tokenizer, ours = smollm2
    x = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf_model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        cache = KVCache(ours.config.n_layer)
        out, step = x, x
        for _ in range(12):  # greedy decoding with the course's cache
            nxt = ours(step, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            out, step = torch.cat([out, nxt], dim=1), nxt
        full = ours(out)
        cache2 = KVCache(ours.config.n_layer)
        cached = torch.cat([ours(out[:, :5], kv_cache=cache2), ours(out[:, 5:], kv_cache=cache2)], dim=1)
    assert out.tolist() == theirs.tolist()
    assert (cached - full).abs().max() < 1e-3


@pytest.mark.slow
def test_from_hf_refuses_other_architectures(smollm2):
    hf_model, _, _ = smollm2

    class NotLlama:
        config = type("C", (), {"model_type": "gpt2"})()
        state_dict = hf_model.state_dict

    with pytest.raises(ValueError, match="model_type='gpt2'"):
        Llama.from_hf(NotLlama())
