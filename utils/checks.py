"""Small argument checks with clear errors, shared by every module and notebook of the course.

The course's rule for bad input: a wrong *type* raises TypeError, a value of the right type but out of
range raises ValueError, and the message says what was wrong and what is allowed. Nothing is silently
clipped. Each check returns the value (converted where that is safe), so it can be used inline:

    k = check_positive_int("k", k)          # 5 -> 5;  0 -> ValueError;  2.0 or True -> TypeError
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only where a tensor is checked: utils.stats needs no torch
    import torch


def check_int(name: str, value, low: int | None = None, high: int | None = None, what: str = "") -> int:
    """An int (not a bool) in [low, high]. Example: check_int("n", 3, low=0) -> 3."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{what}, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else (f"<= {high}" if low is None else f"between {low} and {high}")
        raise ValueError(f"{name} must be an int {bounds}{what}, got {value!r}")
    return value


def check_positive_int(name: str, value, what: str = "") -> int:
    """An int >= 1 (not a bool). Example: check_positive_int("k", 5) -> 5."""
    value = check_int(name, value, what=what)
    if value < 1:
        raise ValueError(f"{name} must be a positive int (>= 1){what}, got {value!r}")
    return value


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (int or float, not a bool, not a string) in the given range, as a float.

    Example: check_number("temperature", 0.7, low=0, high=2) -> 0.7; float("nan") -> ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return value


def check_probability(name: str, value, allow_zero: bool = True) -> float:
    """A number in [0, 1] (or (0, 1] with allow_zero=False). Example: check_probability("p", 0.9) -> 0.9."""
    return check_number(name, value, low=0.0, high=1.0, low_open=not allow_zero)


def check_text(name: str, value, allow_empty: bool = False) -> str:
    """A str (non-empty and not only spaces unless allow_empty). Example: check_text("q", "hi") -> "hi"."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}"[:300])
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def check_text_list(name: str, values, allow_empty_items: bool = False) -> list[str]:
    """A non-empty list (or tuple) of strings; one string alone is refused, since iterating it would
    silently give characters. Example: check_text_list("prompts", ["a", "b"]) -> ["a", "b"]."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not one {type(values).__name__}")
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    if not values:
        raise ValueError(f"{name} must be a non-empty list of strings")
    for i, value in enumerate(values):
        check_text(f"{name}[{i}]", value, allow_empty=allow_empty_items)
    return list(values)


def check_choice(name: str, value, allowed) -> str:
    """One of a fixed set of names. Example: check_choice("index", "flat", ("flat", "hnsw")) -> "flat"."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_finite_tensor(name: str, x, floating: bool = True) -> torch.Tensor:
    """A non-empty torch.Tensor (a float one, or, with floating=False, bool/int converted to float), all finite.

    Example: check_finite_tensor("rewards", torch.tensor([1.0, 2.0])) -> the tensor; [1.0, nan] -> ValueError.
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or (floating and not x.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    x = x if x.is_floating_point() else x.to(torch.get_default_dtype())
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or inf values: all values must be finite")
    return x


def check_same_shape(**tensors) -> None:
    """Tensors that must line up. Example: check_same_shape(a=torch.zeros(2), b=torch.zeros(3)) -> ValueError."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"these tensors must have one shape, got {shapes}")
