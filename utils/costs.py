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
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"price[{key!r}] must be a finite number >= 0, got {value!r}")
        return price
    raise TypeError(f"price must be a model name (str) or a dict, got {type(price).__name__}")


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int (a number of tokens), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def api_cost(input_tokens: int, output_tokens: int, price: str | dict = DEFAULT_PRICE) -> float:
    """Dollars for one request (or a total): tokens / 1e6 x dollars per million, input and output."""
    _check_count("input_tokens", input_tokens)
    _check_count("output_tokens", output_tokens)
    row = get_price(price)
    return (input_tokens * row["input"] + output_tokens * row["output"]) / 1_000_000
