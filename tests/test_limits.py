"""utils.limits: the probes lesson 12 builds at run time (no model needed)."""

from __future__ import annotations

import pytest

from utils.limits import arithmetic_problems, haystack_prompt


def test_arithmetic_problems():
    problems = arithmetic_problems("+", 3, 20, seed=1)
    assert len(problems) == 20 and problems == arithmetic_problems("+", 3, 20, seed=1)
    assert all(100 <= a <= 999 and 100 <= b <= 999 and c == a + b for a, b, c in problems)
    assert all(c == a * b for a, b, c in arithmetic_problems("*", 2, 10))
    assert all(0 <= a <= 9 for a, _, _ in arithmetic_problems("+", 1, 10))
    for bad in (("-", 2, 5), ("+", 0, 5), ("+", 2, 0), ("+", 99, 5)):
        with pytest.raises(ValueError):
            arithmetic_problems(*bad)
    with pytest.raises(TypeError):
        arithmetic_problems("+", 2.0, 5)


class CharTokenizer:
    """Stands in for a HF tokenizer: one token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_haystack_prompt_places_the_needle():
    tok = CharTokenizer()
    filler = tok("One sentence here. " * 100)["input_ids"]
    needle = "The code is 4817."
    first = haystack_prompt(tok, filler, needle, "What is the code?", 600, 0.0)
    last = haystack_prompt(tok, filler, needle, "What is the code?", 600, 1.0)
    middle = haystack_prompt(tok, filler, needle, "What is the code?", 600, 0.5)
    assert first.startswith(needle)
    assert last.split("\n\nQuestion:")[0].endswith(needle)
    document = middle.split("\n\nQuestion:")[0]
    assert 0.4 < document.index(needle) / len(document) < 0.6
    assert abs(len(document) - 600) < 5 and middle.endswith("Question: What is the code?")
    with pytest.raises(ValueError):
        haystack_prompt(tok, filler, needle, "?", 600, 1.5)
    with pytest.raises(ValueError):
        haystack_prompt(tok, filler, needle, "?", 10_000, 0.5)
