"""utils.checks: the shared argument checks (TypeError for a wrong type, ValueError for a wrong value)."""

import math

import numpy as np
import pytest

from utils.checks import (
    check_choice,
    check_int,
    check_number,
    check_positive_int,
    check_probability,
    check_text,
    check_text_list,
)


def test_good_values_come_back():
    assert check_int("n", 3, low=0) == 3 and check_int("n", np.int64(4)) == 4
    assert check_positive_int("k", 5) == 5
    assert check_number("t", 1) == 1.0 and isinstance(check_number("t", 1), float)
    assert check_probability("p", 0.0) == 0.0
    assert check_text("q", "hi") == "hi" and check_text("q", "", allow_empty=True) == ""
    assert check_text_list("xs", ("a", "b")) == ["a", "b"]
    assert check_choice("index", "flat", ("flat", "hnsw")) == "flat"


@pytest.mark.parametrize("call, error, words", [
    (lambda: check_int("n", True), TypeError, "must be an int"),
    (lambda: check_int("n", 2.0), TypeError, "must be an int"),
    (lambda: check_int("n", "2"), TypeError, "must be an int"),
    (lambda: check_int("n", 11, low=0, high=10), ValueError, "between 0 and 10"),
    (lambda: check_positive_int("k", 0), ValueError, ">= 1"),
    (lambda: check_number("t", "0.5"), TypeError, "must be a number"),
    (lambda: check_number("t", math.nan), ValueError, "finite"),
    (lambda: check_number("t", math.inf), ValueError, "finite"),
    (lambda: check_number("t", 3.0, low=0, high=2), ValueError, "[0, 2]"),
    (lambda: check_number("t", 0.0, low=0, low_open=True), ValueError, "(0"),
    (lambda: check_probability("p", 0.0, allow_zero=False), ValueError, "(0, 1]"),
    (lambda: check_probability("p", 1.5), ValueError, "[0, 1]"),
    (lambda: check_text("q", None), TypeError, "must be a str"),
    (lambda: check_text("q", "   "), ValueError, "non-empty"),
    (lambda: check_text_list("xs", "abc"), TypeError, "not one str"),
    (lambda: check_text_list("xs", []), ValueError, "non-empty"),
    (lambda: check_text_list("xs", ["a", 3]), TypeError, "xs[1]"),
    (lambda: check_choice("index", "ivf", ("flat", "hnsw")), ValueError, "['flat', 'hnsw']"),
])
def test_bad_values_say_what_is_allowed(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
