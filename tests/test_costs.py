"""utils.costs: API cost arithmetic from a price table."""

from __future__ import annotations

import pytest

from utils.costs import DEFAULT_PRICE, PRICES, api_cost, get_price


def test_seed_prices_are_in_the_table():
    assert PRICES[DEFAULT_PRICE] == {"input": 3.00, "output": 15.00}
    assert {"input": 5.00, "output": 15.00} in PRICES.values()


def test_api_cost_arithmetic():
    assert api_cost(1_000_000, 0) == pytest.approx(3.00)
    assert api_cost(0, 1_000_000) == pytest.approx(15.00)
    assert api_cost(2_000, 500) == pytest.approx((2_000 * 3 + 500 * 15) / 1e6)
    assert api_cost(1_000_000, 1_000_000, price="mid-size hosted (alt. quote)") == pytest.approx(20.0)
    assert api_cost(10, 10, price={"input": 1, "output": 2}) == pytest.approx(30 / 1e6)
    assert api_cost(0, 0) == 0


def test_get_price_returns_the_row():
    assert get_price() is PRICES[DEFAULT_PRICE]


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((-1, 0), {}, ValueError, "input_tokens must be an int >= 0"),
    ((0, -5), {}, ValueError, "output_tokens must be an int >= 0"),
    ((1.5, 0), {}, TypeError, "input_tokens must be an int"),
    ((True, 0), {}, TypeError, "input_tokens must be an int"),
    ((1, 1), {"price": "gpt-99"}, ValueError, "unknown model price 'gpt-99'"),
    ((1, 1), {"price": {"input": 1}}, ValueError, "exactly the keys"),
    ((1, 1), {"price": {"input": -1, "output": 1}}, ValueError, r"must be in \[0, inf\]"),
    ((1, 1), {"price": {"input": float("nan"), "output": 1}}, ValueError, "must be a finite number"),
    ((1, 1), {"price": {"input": "1", "output": 1}}, TypeError, "must be a number"),
    ((1, 1), {"price": 3.0}, TypeError, "model name"),
])
def test_bad_input(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        api_cost(*args, **kwargs)
