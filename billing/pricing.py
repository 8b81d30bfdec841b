"""Prices and the cost arithmetic. Exact: Decimal in, integer micro-USD out.

A price "per million tokens" in USD is numerically the cost of one token in
micro-USD, so `tokens * price_per_million` is already micro-USD. Each ledger row is
rounded up to a whole micro-dollar (ROUND_CEILING): a request that used any
tokens is never recorded as free, and a reservation computed with the same rule is
always at least the cost it settles into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

ZERO = Decimal(0)
MICRO = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per 1M tokens for each kind of token."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    reasoning: Decimal

    @property
    def max_input(self) -> Decimal:
        # Any prompt token may turn out to be a cache write, which can cost more
        # than a plain input token (Anthropic: 1.25 times).
        return max(self.input, self.cached_input, self.cache_write)

    @property
    def max_output(self) -> Decimal:
        return max(self.output, self.reasoning)


FREE = Prices(ZERO, ZERO, ZERO, ZERO, ZERO)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts in OpenAI's convention.

    `prompt_tokens` includes cached reads and cache writes; `completion_tokens`
    includes reasoning tokens. Anthropic's counts are converted into this form at
    the boundary (its input_tokens exclude both cache kinds).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def per_million_from_per_token(value: Any) -> Decimal | None:
    """litellm's float per-token price → exact USD per million, converted once here."""
    if value is None:
        return None
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(as_float) or as_float < 0:
        return None
    # repr() gives the shortest decimal that round-trips, e.g. 1.5e-07 → 0.15 per million.
    return (Decimal(repr(as_float)) * MICRO).normalize()


def exact_cost_micro_usd(usage: Usage, prices: Prices) -> Decimal:
    cached = max(0, usage.cached_read_tokens)
    writes = max(0, usage.cache_write_tokens)
    plain_input = max(0, usage.prompt_tokens - cached - writes)
    reasoning = max(0, min(usage.reasoning_tokens, usage.completion_tokens))
    plain_output = max(0, usage.completion_tokens - reasoning)
    return (
        plain_input * prices.input
        + cached * prices.cached_input
        + writes * prices.cache_write
        + plain_output * prices.output
        + reasoning * prices.reasoning
    )


def to_micro_usd(exact: Decimal) -> int:
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def list_cost_micro_usd(usage: Usage, prices: Prices) -> int:
    return to_micro_usd(exact_cost_micro_usd(usage, prices))


def charged_cost_micro_usd(usage: Usage, prices: Prices, markup_percent: Decimal) -> int:
    """List cost with the team's markup (or discount, when negative) applied exactly."""
    factor = (Decimal(100) + markup_percent) / Decimal(100)
    return to_micro_usd(max(ZERO, exact_cost_micro_usd(usage, prices) * factor))


def max_cost_micro_usd(
    prompt_tokens: int, max_output_tokens: int, prices: Prices, markup_percent: Decimal
) -> int:
    """The most a request can be charged: the amount reserved against budgets."""
    factor = max(ZERO, (Decimal(100) + markup_percent) / Decimal(100))
    exact = prompt_tokens * prices.max_input + max_output_tokens * prices.max_output
    return to_micro_usd(exact * factor)


def micro_usd_to_str(value: int) -> str:
    """Money in JSON: a decimal string in USD with six places, e.g. "12.500000"."""
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"
