"""What tokens cost: API prices as data, and the arithmetic on top of them (lessons 01 and 11).

Hosted LLM APIs bill per token, with separate prices for the tokens you send (input: the prompt,
the chat history, retrieved documents) and the tokens the model writes (output, usually several
times dearer because each one needs a full forward pass). Prices are quoted in dollars per
million tokens.

The numbers in `PRICES` are *seed* figures for a mid-size hosted model, of the order providers
quoted in 2024-2025; they are not any provider's current price list. Change the table (or pass
your own {"input": ..., "output": ...}) before deciding anything with it: the arithmetic is the
lesson, the prices go stale.
"""

from __future__ import annotations

import math

from utils.checks import check_int, check_number, check_positive_int

# Dollars per million tokens. Add rows freely: each is {"input": $/M, "output": $/M}.
PRICES: dict[str, dict[str, float]] = {
    "mid-size hosted": {"input": 3.00, "output": 15.00},
    "mid-size hosted (alt. quote)": {"input": 5.00, "output": 15.00},
}
DEFAULT_PRICE = "mid-size hosted"


def get_price(price: str | dict = DEFAULT_PRICE) -> dict[str, float]:
    """A price row: a name from PRICES, or your own {"input": $/M, "output": $/M}."""
    if isinstance(price, str):
        if price not in PRICES:
            raise ValueError(f"unknown model price {price!r}; known: {sorted(PRICES)} (or pass a "
                             "dict {'input': dollars per million, 'output': dollars per million})")
        return PRICES[price]
    if isinstance(price, dict):
        if set(price) != {"input", "output"}:
            raise ValueError(f"a price dict needs exactly the keys 'input' and 'output' (dollars per "
                             f"million tokens), got {sorted(price)}")
        for key, value in price.items():
            check_number(f"price[{key!r}]", value, low=0.0)
        return price
    raise TypeError(f"price must be a model name (str) or a dict, got {type(price).__name__}")


def api_cost(input_tokens: int, output_tokens: int, price: str | dict = DEFAULT_PRICE) -> float:
    """Dollars for one request (or a total): tokens / 1e6 x dollars per million, input and output."""
    check_int("input_tokens", input_tokens, low=0, what=" (a number of tokens)")
    check_int("output_tokens", output_tokens, low=0, what=" (a number of tokens)")
    row = get_price(price)
    return (input_tokens * row["input"] + output_tokens * row["output"]) / 1_000_000


# ----------------------------------------------------------------------------------------------
# API or self-hosting? (lesson 11)
#
# An API bills per token; a self-hosted model costs about the same every month whether it serves
# one token or a billion (GPUs rented by the hour, run around the clock). Below some volume the API
# is cheaper, above it self-hosting is: the break-even point. The self-hosting figures are an
# assumption (two rented data-centre GPUs at ~$4/hour), not a quote: change them.

SELF_HOSTING = {"gpu_hourly_usd": 4.00, "gpus": 2, "hours_per_month": 730}
DEFAULT_INPUT_SHARE = 0.75  # chat and RAG requests: most tokens are prompt (input) tokens


def blended_price(price: str | dict = DEFAULT_PRICE, input_share: float = DEFAULT_INPUT_SHARE) -> float:
    """Dollars per million tokens when a fraction input_share of all tokens are input tokens."""
    row = get_price(price)
    share = check_number("input_share", input_share, low=0.0, high=1.0)
    return share * row["input"] + (1 - share) * row["output"]


def api_monthly_cost(tokens_per_month: float, price: str | dict = DEFAULT_PRICE,
                     input_share: float = DEFAULT_INPUT_SHARE) -> float:
    """Dollars per month for tokens_per_month tokens (input + output) through a paid API."""
    tokens = check_number("tokens_per_month", tokens_per_month, low=0.0)
    return tokens / 1_000_000 * blended_price(price, input_share)


def self_hosting_monthly_cost(gpu_hourly_usd: float = SELF_HOSTING["gpu_hourly_usd"],
                              gpus: int = SELF_HOSTING["gpus"],
                              hours_per_month: float = SELF_HOSTING["hours_per_month"],
                              other_monthly_usd: float = 0.0) -> float:
    """Dollars per month for GPUs rented around the clock (plus any other fixed monthly cost)."""
    check_positive_int("gpus", gpus)
    hourly = check_number("gpu_hourly_usd", gpu_hourly_usd, low=0.0)
    hours = check_number("hours_per_month", hours_per_month, low=0.0, high=24 * 31)
    return hourly * gpus * hours + check_number("other_monthly_usd", other_monthly_usd, low=0.0)


def break_even_tokens_per_month(monthly_cost: float, price: str | dict = DEFAULT_PRICE,
                                input_share: float = DEFAULT_INPUT_SHARE) -> float:
    """Tokens per month above which a fixed monthly cost beats paying the API per token."""
    cost = check_number("monthly_cost", monthly_cost, low=0.0)
    per_million = blended_price(price, input_share)
    if per_million == 0:
        return math.inf  # a free API is never beaten
    return cost / per_million * 1_000_000


def price_after_years(price_per_million: float, years: float, yearly_decline: float = 0.5) -> float:
    """A price that falls by `yearly_decline` (0.5 = halves) every year, `years` from now."""
    price = check_number("price_per_million", price_per_million, low=0.0)
    years = check_number("years", years, low=0.0)
    decline = check_number("yearly_decline", yearly_decline, low=0.0, high=1.0)
    if decline == 1.0:
        raise ValueError("yearly_decline must be < 1 (a price that falls 100% a year is free after a year)")
    return price * (1 - decline) ** years
