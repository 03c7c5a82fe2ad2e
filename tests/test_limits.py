"""utils.limits: scorers, probes and confidence intervals used by lesson 12 (no model needed)."""

from __future__ import annotations

import math

import pytest

from utils.data import load_jsonl
from utils.limits import (
    agreement_rate,
    answer_integer,
    arithmetic_problems,
    first_integer,
    generate_batch,
    haystack_prompt,
    is_abstention,
    mentions_any,
    normalize_answer,
    rate_with_ci,
    wilson_interval,
)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert math.isclose(lo, 0.2366, abs_tol=1e-4) and math.isclose(hi, 0.7634, abs_tol=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and math.isclose(hi, 0.2775, abs_tol=1e-4)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1 and lo < 1
    assert rate_with_ci([True, False, True, True]) == "75% [30%, 95%] (3/4)"


@pytest.mark.parametrize("k, n, error", [(3, 0, ValueError), (-1, 5, ValueError), (6, 5, ValueError),
                                         (1.0, 5, TypeError), (True, 5, TypeError)])
def test_wilson_interval_rejects_bad_counts(k, n, error):
    with pytest.raises(error):
        wilson_interval(k, n)


@pytest.mark.parametrize("text, expected", [
    ("I don't know who that is.", True),
    ("I\u2019m not aware of any such prize.", True),
    ("There is no record of a town by that name.", True),
    ("The population of the town is unknown.", True),
    ("The capital city of Ostravenia is Nova Haven.", False),
    ("The Halvorsen Prize was awarded to a Norwegian team.", False),
])
def test_is_abstention(text, expected):
    assert is_abstention(text) is expected


def test_the_preference_data_agrees_with_the_abstention_scorer():
    for pair in load_jsonl("12_preference_pairs.jsonl"):
        if pair["kind"] == "made_up":  # chosen: honest refusal; rejected: a confident invention
            assert is_abstention(pair["chosen"]) and not is_abstention(pair["rejected"]), pair["id"]
        else:  # chosen: the answer; rejected: a needless refusal
            assert not is_abstention(pair["chosen"]) and is_abstention(pair["rejected"]), pair["id"]


def test_answer_scorers():
    assert first_integer("The answer is 1,234.") == 1234
    assert first_integer("-5 apples and 3 pears") == -5
    assert first_integer("no digits here") is None
    assert answer_integer("767 + 753 = 1520") == 1520  # not the echoed operand
    assert answer_integer("35 × 16 = 560.") == 560
    assert answer_integer("The answer is 8.") == 8
    assert answer_integer("17 + 25 =") == 17  # nothing after '=': fall back to the first number
    assert answer_integer("no idea") is None
    assert mentions_any("It is in PARIS, France", ["Paris"]) and not mentions_any("Lyon", ["Paris"])
    assert normalize_answer("Canberra!\nIt is the capital.") == "canberra"
    assert normalize_answer("The  capital is Canberra.") == "the capital is canberra"


def test_agreement_rate():
    assert agreement_rate(["a", "a", "a"]) == 1.0
    assert agreement_rate(["a", "a", "b"]) == pytest.approx(1 / 3)
    assert agreement_rate(["a", "b", "c", "d"]) == 0.0
    with pytest.raises(ValueError):
        agreement_rate(["a"])


def test_arithmetic_problems():
    problems = arithmetic_problems("+", 3, 20, seed=1)
    assert len(problems) == 20 and problems == arithmetic_problems("+", 3, 20, seed=1)
    assert all(100 <= a <= 999 and 100 <= b <= 999 and c == a + b for a, b, c in problems)
    assert all(c == a * b for a, b, c in arithmetic_problems("*", 2, 10))
    assert all(0 <= a <= 9 for a, _, _ in arithmetic_problems("+", 1, 10))
    for bad in (("-", 2, 5), ("+", 0, 5), ("+", 2, 0)):
        with pytest.raises(ValueError):
            arithmetic_problems(*bad)


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


def test_generate_batch_checks_its_arguments_first():
    with pytest.raises(ValueError):
        generate_batch(None, None, "a single string")
    with pytest.raises(ValueError):
        generate_batch(None, None, ["ok"], max_new_tokens=0)
    with pytest.raises(ValueError):
        generate_batch(None, None, ["ok"], temperature=-1)
