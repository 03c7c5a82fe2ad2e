"""utils.answers: the scorers that read model replies (no model needed)."""

from __future__ import annotations

import pytest

from utils.answers import (
    agreement_rate,
    answer_integer,
    check_shape,
    extract_json,
    find_numbers,
    first_integer,
    is_abstention,
    mentions_any,
    normalize_answer,
    normalize_text,
)

ORDER_FIELDS = {"item": str, "quantity": int, "size": ["small", "medium", "large", None],
                "color": ["red", "blue", "dark blue", None]}


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
    with pytest.raises(TypeError):
        check_shape(good, ["item"])


def test_numbers():
    assert find_numbers("He has 12 apples, then 1,200 and -3.5.") == [12, 1200, -3.5]
    assert find_numbers("none") == []
    assert first_integer("The answer is 1,234.") == 1234
    assert first_integer("-5 apples and 3 pears") == -5
    assert first_integer("no digits here") is None
    assert answer_integer("767 + 753 = 1520") == 1520  # not the echoed operand
    assert answer_integer("35 × 16 = 560.") == 560
    assert answer_integer("The answer is 8.") == 8
    assert answer_integer("17 + 25 =") == 17  # nothing after '=': fall back to the first number
    assert answer_integer("no idea") is None
    with pytest.raises(TypeError):
        first_integer(42)


@pytest.mark.parametrize("text, expected", [
    ("I don't know who that is.", True),
    ("I\u2019m not aware of any such prize.", True),
    ("There is no record of a town by that name.", True),
    ("The population of the town is unknown.", True),
    ("That is not mentioned in the passages.", True),
    ("The passages do not say; I cannot answer.", True),
    ("The capital city of Ostravenia is Nova Haven.", False),
    ("The Halvorsen Prize was awarded to a Norwegian team.", False),
    ("Use the os.path module.", False),
])
def test_is_abstention(text, expected):
    assert is_abstention(text) is expected


def test_mentions_any_matches_whole_words_after_normalising():
    assert mentions_any("It is in PARIS, France", ["Paris"]) and not mentions_any("Lyon", ["Paris"])
    assert mentions_any("The answer is 42.", ["forty-two", "42"])
    assert not mentions_any("The answer is 142.", ["42"])  # a number inside another is not a match
    assert not mentions_any("We have 1 cards", ["11"])
    assert mentions_any("It\u2019s  the   os.path module", ["it's the os.path module"])
    assert mentions_any("Use C++ here", ["c++"])


@pytest.mark.parametrize("aliases, error", [("abc", TypeError), ([""], ValueError), ([], ValueError),
                                            ([3], TypeError), (None, TypeError), (["  "], ValueError),
                                            (["."], ValueError), (["42", "-"], ValueError),
                                            (["\u200b"], ValueError), ({"a"}, TypeError)])
def test_mentions_any_refuses_aliases_that_would_match_anything(aliases, error):
    with pytest.raises(error):
        mentions_any("a b c. 1-2", aliases)
    with pytest.raises(TypeError, match="reply must be a str"):
        mentions_any(None, ["a"])


@pytest.mark.parametrize("call, error, match", [
    (lambda: normalize_answer(None), TypeError, "text must be a str"),  # was AttributeError
    (lambda: normalize_answer("x", max_words=0), ValueError, "max_words"),
    (lambda: normalize_answer("x", max_words=2.0), TypeError, "max_words"),
    (lambda: check_shape({"a": 1}, {"a": "int"}), TypeError, "must be int, str or a list"),  # was [] (passes)
    (lambda: check_shape({"a": 1.5}, {"a": float}), TypeError, "must be int, str or a list"),
    (lambda: agreement_rate("aa"), TypeError, "answers must be a list"),
    (lambda: is_abstention(b"I don't know"), TypeError, "reply must be a str"),
    (lambda: first_integer(None), TypeError, "text must be a str"),
    (lambda: extract_json(["{}"]), TypeError, "text must be a str"),
])
def test_scorers_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_normalising_and_agreement():
    assert normalize_text("It\u2019s  Paris") == "it's paris"
    assert normalize_answer("Canberra!\nIt is the capital.") == "canberra"
    assert normalize_answer("The  capital is Canberra.") == "the capital is canberra"
    assert normalize_answer("") == ""
    assert agreement_rate(["a", "a", "a"]) == 1.0
    assert agreement_rate(["a", "a", "b"]) == pytest.approx(1 / 3)
    assert agreement_rate(["a", "b", "c", "d"]) == 0.0
    with pytest.raises(ValueError):
        agreement_rate(["a"])
