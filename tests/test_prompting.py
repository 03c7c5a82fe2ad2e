"""utils.prompting: chat prompts as the model sees them, and answers scored by log-likelihood.

Scoring is checked against one-sequence-at-a-time forward passes on a tiny random Llama that uses SmolLM2's
tokenizer (slow: it loads the tokenizer) and on the stand-in byte tokenizer (fast).
"""

from __future__ import annotations

import pytest
import torch

from tests.standin import random_llama as random_model
from tests.standin import tiny_tokenizer
from utils.prompting import chat_prompt, classify, score_choices, show_tokens


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from utils.models import load_chat_model

    return load_chat_model()[1]


# -------------------------------------------------------------------------------- prompts


@pytest.mark.slow
def test_chat_prompt_renders_the_template(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    text = chat_prompt(tokenizer, "Hi", system="Be brief.", examples=[("Q1", "A1")])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant" in chat_prompt(tokenizer, "Hi")  # the template's default system
    pieces = show_tokens(tokenizer, text)
    assert "".join(t for _, t in pieces) == text and pieces[0][1] == "<|im_start|>"
    with pytest.raises(ValueError):
        chat_prompt(tokenizer, "  ")


# -------------------------------------------------------------------------------- scoring


def brute_force_scores(model, tokenizer, prompts, choices):
    out = torch.empty(len(prompts), len(choices))
    for i, p in enumerate(prompts):
        for j, c in enumerate(choices):
            pi = tokenizer.encode(p, add_special_tokens=False)
            ci = tokenizer.encode(c, add_special_tokens=False)
            with torch.no_grad():
                logp = model(torch.tensor([pi + ci])).logits[0].log_softmax(-1)
            out[i, j] = sum(logp[len(pi) - 1 + t, tok] for t, tok in enumerate(ci))
    return out


@pytest.mark.parametrize("choices", [["positive", "negative"], [" yes it is", "no", " maybe not"]])
def test_score_choices_equals_one_sequence_at_a_time(choices):
    tokenizer = tiny_tokenizer()
    model = random_model(tokenizer, seed=0)
    prompts = [chat_prompt(tokenizer, q, system="Shared system prompt.") for q in
               ["Is it good?", "A much longer question about whether it is good or bad?", "Bad?"]]
    scores = score_choices(model, tokenizer, prompts, choices, batch_size=2)
    torch.testing.assert_close(scores, brute_force_scores(model, tokenizer, prompts, choices), atol=2e-4, rtol=1e-4)
    assert classify(model, tokenizer, prompts, choices) == [choices[j] for j in scores.argmax(-1).tolist()]
    with pytest.raises(ValueError):
        score_choices(model, tokenizer, prompts, ["only one"])
    with pytest.raises(TypeError):
        score_choices(model, tokenizer, "a string, not a list", choices)
