"""utils.calculator: arithmetic right, everything else refused, work bounded (hostile input)."""

from __future__ import annotations

import time

import pytest

from utils.calculator import MAX_CHARS, calculate, calculator_tool


@pytest.mark.parametrize("expression, value", [
    ("2 + 2", 4), ("347 * 28", 9716), ("(17 + 3) * 2**3", 160), ("-5 + +3", -2), ("7 / 2", 3.5),
    ("7 // 2", 3), ("7 % 3", 1), ("2 ** -1", 0.5), ("1.5 * 4", 6.0), ("12 × 3 ÷ 4", 9.0),
    ("123456789 * 987654321", 121932631112635269), ("9 ** 0.5", 3.0), ("10 ** 99", 10 ** 99),
])
def test_arithmetic(expression, value):
    result = calculate(expression)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("expression, words", [
    ("__import__('os').system('echo hacked')", "Call is not allowed"),
    ("os.system", "Attribute is not allowed"),
    ("x + 1", "Name is not allowed"),
    ("open('/etc/passwd').read()", "not allowed"),
    ("(lambda: 1)()", "not allowed"),
    ("[1, 2][0]", "not allowed"),
    ("'a' * 10", "Constant is not allowed"),
    ("True + 1", "Constant is not allowed"),
    ("1j * 2", "Constant is not allowed"),
    ("1 < 2", "Compare is not allowed"),
    ("2 ^ 3", "use \\*\\* for powers"),
    ("1; import os", "not an arithmetic expression"),
    ("9 ** 9 ** 9 ** 9", "more than 100 digits"),
    ("2 ** 1000", "more than 100 digits"),
    ("10 ** 101", "more than 100 digits"),
    ("(10 ** 60) * (10 ** 60)", "exceeds"),
    ("1" * 150, "exceeds"),
    ("1e308 * 10", "exceeds"),
    ("1 / 0", "division by zero"), ("5 % 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("(" * 100 + "1" + ")" * 100, "."),  # deep nesting: refused (by length or depth), not a crash
    ("-" * 120 + "1", "nested deeper"),
    ("1 +" * 100 + "1", "characters"),
])
def test_hostile_input_is_refused_quickly(expression, words):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        calculate(expression)
    assert time.perf_counter() - start < 0.5  # no expression makes it work for long


def test_wrong_types_and_the_tool_wrapper():
    with pytest.raises(TypeError):
        calculate(42)
    with pytest.raises(ValueError):
        calculate("")
    assert calculator_tool("6 * 7") == "42"
    assert calculator_tool("1 / 3") == "0.3333333333"
    assert calculator_tool("__import__('os')").startswith("error: Call is not allowed")
    assert calculator_tool("x" * (MAX_CHARS + 1)).startswith("error: the expression has")
