"""utils.generation: the one batched generator, tested for its outputs with stand-in models (fast) and
against HF generate on SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch

from tests.standin import ScriptedModel, tiny_chat_model
from utils.generation import chat, generate_batch, render_prompts, shared_prefix_length


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model(seed=0)


def hf_one_at_a_time(model, tokenizer, texts, max_new_tokens):
    replies = []
    for text in texts:  # one prompt at a time: no padding at all
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip())
    return replies


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2]]) == 1  # each keeps one token of its own
    assert shared_prefix_length([[7], [8, 9]]) == 0


def test_a_scripted_model_gives_exactly_its_script_for_every_prompt_length(tiny):
    _, tokenizer = tiny
    model = ScriptedModel(tokenizer, "Paris is the capital.")
    prompts = ["Q?", "A much longer question, so that padding matters?", "Mid-length one?"]
    replies = generate_batch(model, tokenizer, prompts, max_new_tokens=40, batch_size=2)
    assert replies == ["Paris is the capital."] * 3
    cut = generate_batch(model, tokenizer, prompts, max_new_tokens=5)
    assert cut == ["Paris"] * 3  # max_new_tokens counts tokens (bytes here)
    assert generate_batch(model, tokenizer, prompts, max_new_tokens=40, stop=" the") == ["Paris is"] * 3
    # sampling cannot leave a distribution that puts all its mass on one token
    assert generate_batch(model, tokenizer, prompts[:1], 40, temperature=1.0, seed=3) == ["Paris is the capital."]


def test_batched_greedy_equals_hf_generate_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    conversations = [[{"role": "system", "content": "Shared system prompt."}, {"role": "user", "content": q}]
                     for q in ["Hi", "What is the longest river in the world?", "2 + 2 = ?", "Name a sea."]]
    texts = render_prompts(tokenizer, conversations)
    ours = generate_batch(model, tokenizer, conversations, max_new_tokens=12, batch_size=3)
    assert ours == hf_one_at_a_time(model, tokenizer, texts, 12)
    assert generate_batch(model, tokenizer, texts, max_new_tokens=12, batch_size=1) == ours  # str prompts


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, tokenizer = tiny
    prompts = ["Once upon a time", "The weather today"]
    a = generate_batch(model, tokenizer, prompts, 16, temperature=1.5, seed=1)
    assert a == generate_batch(model, tokenizer, prompts, 16, temperature=1.5, seed=1)
    assert a != generate_batch(model, tokenizer, prompts, 16, temperature=1.5, seed=2)
    assert generate_batch(model, tokenizer, prompts, 16) != a  # greedy differs from a hot sample


def test_chat_is_one_greedy_turn(tiny):
    _, tokenizer = tiny
    model = ScriptedModel(tokenizer, "Hello!")
    assert chat(model, tokenizer, "Hi", system="Be brief.") == "Hello!"
    with pytest.raises(ValueError, match="non-empty"):
        chat(model, tokenizer, "   ")


@pytest.mark.parametrize("kwargs, error", [
    (dict(prompts="one string"), TypeError),
    (dict(prompts=[]), ValueError),
    (dict(prompts=[""]), ValueError),
    (dict(prompts=[[{"role": "user"}]]), ValueError),
    (dict(prompts=[42]), TypeError),
    (dict(max_new_tokens=0), ValueError),
    (dict(max_new_tokens=2.0), TypeError),
    (dict(batch_size=0), ValueError),
    (dict(temperature=-1), ValueError),
    (dict(temperature="0.5"), TypeError),
    (dict(top_p=0.0), ValueError),
    (dict(temperature=1.0, seed=-1), ValueError),
    (dict(stop=""), ValueError),
])
def test_bad_input_is_refused_before_any_work(tiny, kwargs, error):
    model, tokenizer = tiny
    args = dict(prompts=["ok"], max_new_tokens=4) | kwargs
    with pytest.raises(error):
        generate_batch(model, tokenizer, args.pop("prompts"), **args)


@pytest.mark.slow
def test_generate_batch_matches_hf_generate_on_the_real_model():
    from utils.models import load_chat_model
    from utils.prompting import chat_prompt

    model, tokenizer = load_chat_model()
    prompts = [chat_prompt(tokenizer, q, system="Answer in a few words.") for q in
               ["What colour is the sky?", "Name a large animal that lives in the sea, please.", "2 + 2 = ?"]]
    ours = generate_batch(model, tokenizer, prompts, max_new_tokens=10, batch_size=2)
    assert ours == hf_one_at_a_time(model, tokenizer, prompts, 10)
    assert "Paris" in chat(model, tokenizer, "What is the capital of France?")
    torch.set_num_threads(torch.get_num_threads())
