"""utils.constrained: the grammar keeps the output valid whatever the model prefers.

Stress-tested with tiny *random* Llamas: a random model prefers arbitrary tokens, so the grammar, not the
model, is what keeps the output valid. Run with the stand-in byte-level tokenizer (fast) and with SmolLM2's
real BPE tokenizer (slow: it loads the model's tokenizer).
"""

from __future__ import annotations

import json

import pytest

from tests.standin import random_llama as random_model
from tests.standin import tiny_tokenizer
from utils.answers import check_shape
from utils.constrained import Choice, Grammar, Integer, Literal, String, json_grammar, label_grammar
from utils.generation import generate_batch
from utils.prompting import chat_prompt

ORDER_FIELDS = {"item": str, "quantity": int, "size": ["small", "medium", "large", None],
                "color": ["red", "blue", "dark blue", None]}


def smollm2_tokenizer():
    from utils.models import load_chat_model

    return load_chat_model()[1]


@pytest.fixture(scope="module", params=[pytest.param("standin"), pytest.param("smollm2", marks=pytest.mark.slow)])
def tokenizer(request):
    return tiny_tokenizer() if request.param == "standin" else smollm2_tokenizer()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_constraint_always_yields_a_label(tokenizer, seed):
    model = random_model(tokenizer, seed)
    labels = ["positive", "negative", "neutral"]
    prompts = [chat_prompt(tokenizer, f"Review {i}: {'great' if i % 2 else 'awful'}. Sentiment?") for i in range(6)]
    free = generate_batch(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert not all(f in labels for f in free)  # without the constraint a random model writes anything
    constrained = generate_batch(model, tokenizer, prompts, max_new_tokens=12, batch_size=4,
                                 grammar=label_grammar(tokenizer, labels))
    assert all(c in labels for c in constrained), constrained


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_constraint_always_yields_the_shape(tokenizer, seed):
    model = random_model(tokenizer, seed)
    grammar = json_grammar(tokenizer, ORDER_FIELDS)
    prompts = [chat_prompt(tokenizer, f"Order {i}: two red mugs. JSON:") for i in range(4)]
    replies = generate_batch(model, tokenizer, prompts, max_new_tokens=200, batch_size=4, grammar=grammar)
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
