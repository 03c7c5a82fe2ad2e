"""utils.costs, lesson 11 part: API vs self-hosting break-even and falling prices."""

from __future__ import annotations

import math

import pytest

from utils.costs import (
    SELF_HOSTING,
    api_cost,
    api_monthly_cost,
    blended_price,
    break_even_tokens_per_month,
    price_after_years,
    self_hosting_monthly_cost,
)


def test_blended_price_weights_input_and_output():
    assert blended_price({"input": 3, "output": 15}, input_share=0.75) == pytest.approx(6.0)
    assert blended_price({"input": 3, "output": 15}, input_share=1.0) == pytest.approx(3.0)
    assert blended_price({"input": 3, "output": 15}, input_share=0.0) == pytest.approx(15.0)


def test_api_monthly_cost_agrees_with_api_cost():
    tokens = 4_000_000
    blended = api_monthly_cost(tokens, input_share=0.75)
    assert blended == pytest.approx(api_cost(3_000_000, 1_000_000))


def test_self_hosting_cost_and_the_seeds_break_even():
    monthly = self_hosting_monthly_cost(**SELF_HOSTING)
    assert monthly == pytest.approx(4.0 * 2 * 730)
    tokens = break_even_tokens_per_month(monthly)  # default: $3/$15, 75% input -> $6 per million
    assert tokens == pytest.approx(monthly / 6.0 * 1e6)
    assert 0.5e9 < tokens < 2e9  # "above ~1B tokens/month"
    # at the break-even volume the two cost the same; above it the API costs more
    assert api_monthly_cost(tokens) == pytest.approx(monthly)
    assert api_monthly_cost(2 * tokens) > monthly
    assert self_hosting_monthly_cost(2.0, 1, 730, other_monthly_usd=100) == pytest.approx(1560.0)


def test_a_free_api_is_never_beaten():
    assert break_even_tokens_per_month(1000, price={"input": 0, "output": 0}) == math.inf


def test_price_halving_every_year():
    assert price_after_years(6.0, 0) == 6.0
    assert price_after_years(6.0, 1) == pytest.approx(3.0)
    assert price_after_years(6.0, 3) == pytest.approx(0.75)
    assert price_after_years(6.0, 2, yearly_decline=0.0) == 6.0


@pytest.mark.parametrize("call, error", [
    (lambda: blended_price(input_share=1.5), ValueError),
    (lambda: blended_price(input_share="half"), TypeError),
    (lambda: blended_price(price="no such model"), ValueError),
    (lambda: api_monthly_cost(-1), ValueError),
    (lambda: api_monthly_cost(float("nan")), ValueError),
    (lambda: api_monthly_cost("1e9"), TypeError),
    (lambda: self_hosting_monthly_cost(gpus=0), ValueError),
    (lambda: self_hosting_monthly_cost(gpus=1.5), TypeError),
    (lambda: self_hosting_monthly_cost(gpu_hourly_usd=-2), ValueError),
    (lambda: self_hosting_monthly_cost(hours_per_month=1000), ValueError),
    (lambda: break_even_tokens_per_month(-5), ValueError),
    (lambda: price_after_years(6.0, -1), ValueError),
    (lambda: price_after_years(6.0, 1, yearly_decline=1.0), ValueError),
    (lambda: price_after_years(6.0, 1, yearly_decline=1.5), ValueError),
    (lambda: price_after_years(True, 1), TypeError),
])
def test_bad_input_is_refused(call, error):
    with pytest.raises(error):
        call()
