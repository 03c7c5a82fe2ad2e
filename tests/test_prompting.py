"""utils.prompting: statistics, JSON checks, batched scoring/generation, and constrained decoding.

Constrained decoding is stress-tested with a tiny *random* Llama that uses SmolLM2's tokenizer: a
random model prefers arbitrary tokens, so the grammar, not the model, is what keeps the output valid.
One test compares batched generation with HF generate on the real model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from utils.prompting import (
    Choice,
    Grammar,
    Integer,
    Literal,
    String,
    accuracy_ci,
    chat_prompt,
    check_shape,
    classify,
    extract_json,
    find_numbers,
    generate_batch,
    json_grammar,
    label_grammar,
    mcnemar_p,
    score_choices,
    show_tokens,
    wilson_interval,
)

ORDER_FIELDS = {"item": str, "quantity": int, "size": ["small", "medium", "large", None],
                "color": ["red", "blue", "dark blue", None]}


@pytest.fixture(scope="module")
def real():
    from utils.env import setup_notebook
    from utils.models import load_chat_model

    setup_notebook(seed=0)
    return load_chat_model()


@pytest.fixture(scope="module")
def tokenizer(real):
    return real[1]


def random_model(tokenizer, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=1.0)  # large weights: peaked, arbitrary preferences
    return LlamaForCausalLM(config).eval()


# -------------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    # 0 out of n: the upper bound is z^2 / (n + z^2) exactly
    low, high = wilson_interval(0, 10)
    assert low == 0 and math.isclose(high, 1.96 ** 2 / (10 + 1.96 ** 2), rel_tol=1e-12)
    assert wilson_interval(10, 10)[1] == 1 and math.isclose(wilson_interval(10, 10)[0], 1 - high, rel_tol=1e-12)
    low, high = wilson_interval(5, 10)
    assert round(low, 4) == 0.2366 and round(high, 4) == 0.7634  # symmetric around 0.5
    # each bound p solves (k/n - p)^2 = z^2 p (1 - p) / n
    k, n, z = 37, 80, 1.96
    for p in wilson_interval(k, n):
        assert math.isclose((k / n - p) ** 2, z * z * p * (1 - p) / n, rel_tol=1e-9)
    assert wilson_interval(37, 80, z=2.58)[0] < wilson_interval(37, 80)[0]  # 99% is wider


def test_wilson_bad_input():
    for args in [(1, 0), (-1, 10), (11, 10)]:
        with pytest.raises(ValueError):
            wilson_interval(*args)
    for args in [(1.5, 10), (True, 10), (3, 10.0)]:
        with pytest.raises(TypeError, match="must be an int"):
            wilson_interval(*args)
    with pytest.raises(ValueError):
        accuracy_ci([])


def test_accuracy_ci_and_mcnemar():
    acc = accuracy_ci([True] * 30 + [False] * 10)
    assert (acc.k, acc.n, acc.value) == (30, 40, 0.75)
    assert (acc.low, acc.high) == wilson_interval(30, 40)
    assert str(acc).startswith("0.75 [")
    assert mcnemar_p([True, False] * 5, [True, False] * 5) == 1.0
    assert math.isclose(mcnemar_p([True] * 10, [False] * 10), 2 / 2 ** 10)
    a = [True] * 8 + [False] * 2 + [True] * 20
    b = [False] * 8 + [True] * 2 + [True] * 20  # 8 vs 2 discordant pairs
    assert math.isclose(mcnemar_p(a, b), 2 * sum(math.comb(10, i) for i in range(3)) / 2 ** 10)
    with pytest.raises(ValueError):
        mcnemar_p([True], [True, False])


# -------------------------------------------------------------------------------- reading answers


def test_extract_json_and_check_shape():
    assert extract_json('Sure! ```json\n{"a": 1, "b": {"c": 2}}\n``` done') == {"a": 1, "b": {"c": 2}}
    assert extract_json("no json {here") is None
    assert extract_json('[1, 2] then {"x": null}') == {"x": None}
    good = {"item": "mug", "quantity": 2, "size": None, "color": "red"}
    assert check_shape(good, ORDER_FIELDS) == []
    problems = check_shape({"item": 3, "quantity": "2", "size": "huge", "extra": 1}, ORDER_FIELDS)
    assert len(problems) == 5 and any("color" in p for p in problems) and any("extra" in p for p in problems)
    assert check_shape({**good, "quantity": True}, ORDER_FIELDS)  # a bool is not an integer
    assert check_shape([1], ORDER_FIELDS)


def test_find_numbers():
    assert find_numbers("He has 12 apples, then 1,200 and -3.5.") == [12, 1200, -3.5]
    assert find_numbers("none") == []


# -------------------------------------------------------------------------------- prompts


def test_chat_prompt_renders_the_template(tokenizer):
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
def test_score_choices_equals_one_sequence_at_a_time(tokenizer, choices):
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


# -------------------------------------------------------------------------------- generation


def test_generate_batch_matches_hf_generate_on_the_real_model(real):
    model, tokenizer = real
    prompts = [chat_prompt(tokenizer, q, system="Answer in a few words.") for q in
               ["What colour is the sky?", "Name a large animal that lives in the sea, please.", "2 + 2 = ?"]]
    ours = generate_batch(model, tokenizer, prompts, max_new_tokens=10, batch_size=2)
    theirs = []
    for p in prompts:  # one at a time: no padding at all
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        theirs.append(tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip())
    assert ours == theirs


def test_generate_batch_bad_input(tokenizer):
    model = random_model(tokenizer, seed=0)
    with pytest.raises(ValueError):
        generate_batch(model, tokenizer, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError):
        generate_batch(model, tokenizer, [])
    with pytest.raises(ValueError):
        generate_batch(model, tokenizer, ["hi"], batch_size=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_constraint_always_yields_a_label(tokenizer, seed):
    model = random_model(tokenizer, seed)
    labels = ["positive", "negative", "neutral"]
    prompts = [chat_prompt(tokenizer, f"Review {i}: {'great' if i % 2 else 'awful'}. Sentiment?") for i in range(6)]
    free = generate_batch(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert not all(f in labels for f in free)  # without the constraint a random model writes anything
    constrained = generate_batch(model, tokenizer, prompts, max_new_tokens=6, batch_size=4,
                                 grammar=label_grammar(tokenizer, labels))
    assert all(c in labels for c in constrained), constrained


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_constraint_always_yields_the_shape(tokenizer, seed):
    model = random_model(tokenizer, seed)
    grammar = json_grammar(tokenizer, ORDER_FIELDS)
    prompts = [chat_prompt(tokenizer, f"Order {i}: two red mugs. JSON:") for i in range(4)]
    replies = generate_batch(model, tokenizer, prompts, max_new_tokens=120, batch_size=4, grammar=grammar)
    for reply in replies:
        value = json.loads(reply)
        assert check_shape(value, ORDER_FIELDS) == [], reply
        assert reply == json.dumps(value)  # written exactly as json.dumps would


def test_grammar_state_machine_by_hand(tokenizer):
    grammar = Grammar(tokenizer, [Literal("n="), Integer(max_digits=3), Literal(";"), Choice(("ab", "cd"))])
    state = grammar.start()
    for piece in ["n", "=", "4", "2", ";", "c", "d"]:
        (token,) = tokenizer.encode(piece, add_special_tokens=False)
        assert grammar.allowed(state)[token], (piece, state)
        state = grammar.advance(state, token)
    assert grammar.done(state)
    assert grammar.allowed(state).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    zero = tokenizer.encode("0", add_special_tokens=False)[0]
    s = grammar.advance(grammar.start(), tokenizer.encode("n=", add_special_tokens=False)[0]) \
        if len(tokenizer.encode("n=", add_special_tokens=False)) == 1 else (1, "")
    s = grammar.advance(s, zero)
    assert not grammar.allowed(s)[tokenizer.encode("7", add_special_tokens=False)[0]]  # no "07"
    with pytest.raises(ValueError, match="prefix"):
        Grammar(tokenizer, [Choice(("a", "ab"))])
    with pytest.raises(TypeError):
        Grammar(tokenizer, ["not a segment"])
    with pytest.raises(ValueError):
        json_grammar(tokenizer, {"x": float})
    assert isinstance(json_grammar(tokenizer, {"name": str}).segments[1], String)
