"""A calculator tool that is safe to hand to a model: arithmetic only, never `eval`. Shown in lesson 16.

A model's tool arguments are untrusted input: a retrieved web page or a user can make the model write
anything into them. `eval("__import__('os').system('rm -rf ~')")` would run it; so would
`eval("9**9**9**9")` (hours of CPU, gigabytes of memory). `calculate` parses the expression with
Python's own parser (`ast.parse`) and walks the tree itself, allowing only:

* numbers (int or float; not True/False, not complex), + - * / // % ** and unary + -, parentheses;
* nothing else: no names, attributes, calls, subscripts, comparisons, lambdas, strings.

And it bounds the work: at most MAX_CHARS characters (which also bounds the nesting), powers with an
integer exponent whose result has at most MAX_RESULT_DIGITS digits (estimated before computing it),
and every intermediate value at most 10**MAX_RESULT_DIGITS. Anything else is a ValueError that says
what was refused, which the agent feeds back to the model as the tool's result.
"""

from __future__ import annotations

import ast
import math
import operator

from utils.checks import check_text

MAX_CHARS = 200          # characters in an expression
MAX_RESULT_DIGITS = 100  # digits of any intermediate or final value
MAX_DEPTH = 30           # nesting of the expression tree

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
LIMIT = 10 ** MAX_RESULT_DIGITS


def _checked(value):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    if abs(value) > LIMIT:
        raise ValueError(f"a value exceeds 10**{MAX_RESULT_DIGITS}; this calculator refuses numbers that large")
    return value


def _power(base, exponent):
    if not isinstance(exponent, int):
        if base < 0:
            raise ValueError("a negative number to a fractional power is not a real number")
        return _checked(float(base) ** exponent)
    if abs(exponent) > 10_000 or (base not in (0, 1, -1) and
                                  abs(exponent) * math.log10(max(abs(base), 1e-300)) > MAX_RESULT_DIGITS):
        raise ValueError(f"the power {base}**{exponent} would have more than {MAX_RESULT_DIGITS} digits")
    return _checked(base ** exponent)


def _evaluate(node, depth: int = 0):
    if depth > MAX_DEPTH:
        raise ValueError(f"the expression is nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, depth + 1)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        return _checked(BINARY[type(node.op)](left, right))
    what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
    hint = " (use ** for powers)" if what == "BitXor" else ""
    raise ValueError(f"{what} is not allowed: only numbers, + - * / // % ** and parentheses{hint}")


def calculate(expression: str):
    """The value of an arithmetic expression, or ValueError saying what was refused.

    Example: calculate("(17 + 3) * 2**3") -> 160; calculate("__import__('os')") -> ValueError.
    Shown in lesson 16.
    """
    check_text("expression", expression)
    if len(expression) > MAX_CHARS:
        raise ValueError(f"the expression has {len(expression)} characters; at most {MAX_CHARS} are allowed")
    text = expression.replace("×", "*").replace("÷", "/").strip()
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as err:
        raise ValueError(f"not an arithmetic expression ({type(err).__name__}): {expression!r}") from None
    return _evaluate(tree)


def calculator_tool(expression: str) -> str:
    """calculate() as a tool's text result: the number, or "error: ..." for the model to read.

    Example: calculator_tool("2 + 2") -> "4"; calculator_tool("x + 1") -> "error: Name is not allowed: ..."
    """
    try:
        value = calculate(expression)
    except (ValueError, TypeError) as err:
        return f"error: {err}"
    return str(round(value, 10) if isinstance(value, float) else value)
