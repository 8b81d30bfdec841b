"""The cost arithmetic of billing.pricing, checked against an independent exact oracle.

The oracle below is written from the definitions in the docstrings, not from the code:
a price "per 1M tokens" in USD is the price of one token in micro-USD; prompt tokens
include cached reads and cache writes, completion tokens include reasoning tokens; a row
costs the exact amount rounded UP to a whole micro-dollar; markup scales the exact amount
by (100 + markup) / 100 before rounding. It computes with Fraction, so no Decimal context
(precision, rounding) can hide a discrepancy.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from billing.pricing import (
    Prices,
    Usage,
    charged_cost_micro_usd,
    exact_cost_micro_usd,
    list_cost_micro_usd,
    max_cost_micro_usd,
    micro_usd_to_str,
    per_million_from_per_token,
)

# --- the oracle ----------------------------------------------------------------------------------


def oracle_exact(usage: Usage, prices: Prices) -> Fraction:
    plain_input = usage.prompt_tokens - usage.cached_read_tokens - usage.cache_write_tokens
    plain_output = usage.completion_tokens - usage.reasoning_tokens
    assert plain_input >= 0 and plain_output >= 0, "the strategies only build consistent usage"
    return (
        plain_input * Fraction(prices.input)
        + usage.cached_read_tokens * Fraction(prices.cached_input)
        + usage.cache_write_tokens * Fraction(prices.cache_write)
        + plain_output * Fraction(prices.output)
        + usage.reasoning_tokens * Fraction(prices.reasoning)
    )


def oracle_charged(usage: Usage, prices: Prices, markup: Decimal) -> int:
    scaled = oracle_exact(usage, prices) * (100 + Fraction(markup)) / 100
    return max(0, math.ceil(scaled))


def oracle_reservation(prompt: int, max_output: int, prices: Prices, markup: Decimal) -> int:
    worst_input = max(Fraction(prices.input), Fraction(prices.cached_input))
    worst_input = max(worst_input, Fraction(prices.cache_write))
    worst_output = max(Fraction(prices.output), Fraction(prices.reasoning))
    factor = max(Fraction(0), (100 + Fraction(markup)) / 100)
    return math.ceil((prompt * worst_input + max_output * worst_output) * factor)


# --- strategies ----------------------------------------------------------------------------------

# Prices as the deployment table stores them: up to 6 decimal places (a DecimalField).
price = st.integers(min_value=0, max_value=200_000_000).map(lambda n: Decimal(n).scaleb(-6))
nonzero_price = st.integers(min_value=1, max_value=200_000_000).map(lambda n: Decimal(n).scaleb(-6))
prices_st = st.builds(
    Prices,
    input=price,
    output=price,
    cached_input=price,
    cache_write=price,
    reasoning=price,
)
# A team's markup: -100 (free) to +1000 percent, three decimal places (the model field).
markup_st = st.integers(min_value=-100_000, max_value=1_000_000).map(
    lambda n: Decimal(n).scaleb(-3)
)
tokens = st.integers(min_value=0, max_value=2_000_000)


@st.composite
def usage_st(
    draw: st.DrawFn, max_prompt: int = 2_000_000, max_completion: int = 2_000_000
) -> Usage:
    """A usage in OpenAI's convention: the kinds are parts of prompt and completion."""
    prompt = draw(st.integers(min_value=0, max_value=max_prompt))
    cached = draw(st.integers(min_value=0, max_value=prompt))
    writes = draw(st.integers(min_value=0, max_value=prompt - cached))
    completion = draw(st.integers(min_value=0, max_value=max_completion))
    reasoning = draw(st.integers(min_value=0, max_value=completion))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_read_tokens=cached,
        cache_write_tokens=writes,
        reasoning_tokens=reasoning,
    )


# --- properties ----------------------------------------------------------------------------------


@given(usage=usage_st(), prices=prices_st)
@example(usage=Usage(), prices=Prices(*[Decimal("3")] * 5))
@example(
    usage=Usage(prompt_tokens=10, cached_read_tokens=10),
    prices=Prices(Decimal("1"), Decimal("1"), Decimal("0.1"), Decimal("1"), Decimal("1")),
)
def test_it_computes_the_exact_cost_of_every_kind_of_token(usage, prices):
    exact = exact_cost_micro_usd(usage, prices)

    assert isinstance(exact, Decimal)
    assert Fraction(exact) == oracle_exact(usage, prices)


@given(usage=usage_st(), prices=prices_st)
def test_it_rounds_the_list_cost_up_to_a_whole_micro_dollar(usage, prices):
    cost = list_cost_micro_usd(usage, prices)

    assert isinstance(cost, int)
    assert cost == math.ceil(oracle_exact(usage, prices))


@given(usage=usage_st(), prices=prices_st, markup=markup_st)
@example(usage=Usage(prompt_tokens=1), prices=Prices(*[Decimal("1")] * 5), markup=Decimal(-100))
@example(usage=Usage(prompt_tokens=1), prices=Prices(*[Decimal("1")] * 5), markup=Decimal("1000"))
def test_it_applies_the_markup_exactly_before_rounding(usage, prices, markup):
    charged = charged_cost_micro_usd(usage, prices, markup)

    assert isinstance(charged, int)
    assert charged == oracle_charged(usage, prices, markup)


@given(usage=usage_st(), prices=prices_st)
def test_it_charges_list_price_with_no_markup(usage, prices):
    assert charged_cost_micro_usd(usage, prices, Decimal(0)) == list_cost_micro_usd(usage, prices)


@given(usage=usage_st(), prices=prices_st, low=markup_st, high=markup_st)
def test_it_never_charges_less_for_a_higher_markup(usage, prices, low, high):
    low, high = min(low, high), max(low, high)

    assert charged_cost_micro_usd(usage, prices, low) <= charged_cost_micro_usd(usage, prices, high)


@given(usage=usage_st(), prices=prices_st)
def test_it_charges_nothing_at_a_100_percent_discount(usage, prices):
    assert charged_cost_micro_usd(usage, prices, Decimal("-100")) == 0


@given(data=st.data(), prices=prices_st, markup=markup_st)
def test_it_reserves_at_least_what_any_request_that_fits_can_cost(data, prices, markup):
    reserved_prompt = data.draw(st.integers(min_value=0, max_value=2_000_000), "reserved_prompt")
    max_output = data.draw(st.integers(min_value=0, max_value=2_000_000), "max_output")
    # Any actual usage within the reservation, split into any mix of token kinds.
    usage = data.draw(usage_st(max_prompt=reserved_prompt, max_completion=max_output), "usage")

    reservation = max_cost_micro_usd(reserved_prompt, max_output, prices, markup)

    assert reservation == oracle_reservation(reserved_prompt, max_output, prices, markup)
    assert reservation >= charged_cost_micro_usd(usage, prices, markup)


@given(data=st.data(), prices=prices_st, markup=markup_st)
def test_it_reserves_exactly_the_worst_case_split(data, prices, markup):
    """The reservation is not loose: the most expensive split of the tokens costs that much."""
    prompt = data.draw(tokens, "prompt")
    max_output = data.draw(tokens, "max_output")
    kinds = {
        "input": prices.input,
        "cached": prices.cached_input,
        "writes": prices.cache_write,
    }
    worst_input = max(kinds, key=lambda k: kinds[k])
    worst = Usage(
        prompt_tokens=prompt,
        completion_tokens=max_output,
        cached_read_tokens=prompt if worst_input == "cached" else 0,
        cache_write_tokens=prompt if worst_input == "writes" else 0,
        reasoning_tokens=max_output if prices.reasoning > prices.output else 0,
    )

    assert max_cost_micro_usd(prompt, max_output, prices, markup) == charged_cost_micro_usd(
        worst, prices, markup
    )


@given(usage=usage_st(), prices=prices_st, markup=markup_st, data=st.data())
def test_it_never_records_a_request_that_used_priced_tokens_as_free(usage, prices, markup, data):
    kind = data.draw(st.sampled_from(["input", "cached", "writes", "output", "reasoning"]))
    tiny = data.draw(nonzero_price, "tiny")
    # Make sure the drawn kind has at least one token and a nonzero price.
    fields = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_read_tokens": usage.cached_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
    }
    price_of = {
        "input": "input",
        "cached": "cached_input",
        "writes": "cache_write",
        "output": "output",
        "reasoning": "reasoning",
    }
    if kind == "input":
        fields["prompt_tokens"] += 1
    elif kind == "cached":
        fields["prompt_tokens"] += 1
        fields["cached_read_tokens"] += 1
    elif kind == "writes":
        fields["prompt_tokens"] += 1
        fields["cache_write_tokens"] += 1
    elif kind == "output":
        fields["completion_tokens"] += 1
    else:
        fields["completion_tokens"] += 1
        fields["reasoning_tokens"] += 1
    used = Usage(**fields)
    priced = Prices(
        **{
            name: (tiny if name == price_of[kind] else getattr(prices, name))
            for name in ("input", "output", "cached_input", "cache_write", "reasoning")
        }
    )
    assume(markup > Decimal(-100))

    assert list_cost_micro_usd(used, priced) >= 1
    assert charged_cost_micro_usd(used, priced, markup) >= 1


@given(usage=usage_st(), markup=markup_st)
def test_it_charges_nothing_for_free_models(usage, markup):
    free = Prices(*[Decimal(0)] * 5)

    assert list_cost_micro_usd(usage, free) == 0
    assert charged_cost_micro_usd(usage, free, markup) == 0


@given(prices=prices_st, markup=markup_st)
def test_it_charges_nothing_for_zero_tokens(prices, markup):
    assert exact_cost_micro_usd(Usage(), prices) == 0
    assert list_cost_micro_usd(Usage(), prices) == 0
    assert charged_cost_micro_usd(Usage(), prices, markup) == 0
    assert max_cost_micro_usd(0, 0, prices, markup) == 0


MONEY = re.compile(r"^-?\d+\.\d{6}$")


@given(value=st.integers(min_value=-(10**15), max_value=10**15))
@example(value=0)
@example(value=-1)
@example(value=999_999)
@example(value=1_000_000)
def test_it_formats_micro_usd_as_a_decimal_string_that_round_trips(value):
    text = micro_usd_to_str(value)

    assert MONEY.match(text), text
    assert Decimal(text) * 1_000_000 == value
    assert Decimal(text).as_tuple().exponent == -6


@given(
    mantissa=st.integers(min_value=1, max_value=999_999_999),
    exponent=st.integers(min_value=-15, max_value=-3),
)
@example(mantissa=15, exponent=-8)  # 1.5e-07: $0.15 per 1M tokens
@example(mantissa=3, exponent=-6)  # 3e-06: $3 per 1M tokens
@example(mantissa=125, exponent=-8)  # 1.25e-06
def test_it_converts_litellm_float_prices_per_token_to_exact_prices_per_million(mantissa, exponent):
    per_token = Decimal(mantissa).scaleb(exponent)
    litellm_float = float(per_token)  # what litellm's price map holds

    converted = per_million_from_per_token(litellm_float)

    assert isinstance(converted, Decimal)
    assert converted == per_token * 1_000_000


@pytest.mark.parametrize("value", [None, "n/a", float("nan"), float("inf"), -1e-06, object()])
def test_it_ignores_prices_that_are_not_prices(value):
    assert per_million_from_per_token(value) is None


# --- examples with hand-computed numbers ---------------------------------------------------------


def test_it_prices_an_anthropic_like_request_with_cache_and_reasoning():
    prices = Prices(
        input=Decimal("3"),
        output=Decimal("15"),
        cached_input=Decimal("0.30"),
        cache_write=Decimal("3.75"),
        reasoning=Decimal("15"),
    )
    usage = Usage(
        prompt_tokens=1000,
        completion_tokens=500,
        cached_read_tokens=200,
        cache_write_tokens=100,
        reasoning_tokens=300,
    )

    # 700 plain * 3 + 200 cached * 0.30 + 100 writes * 3.75 + 200 out * 15 + 300 reasoning * 15
    #   = 2100 + 60 + 375 + 3000 + 4500 = 10035 micro-USD
    assert exact_cost_micro_usd(usage, prices) == Decimal(10035)
    assert list_cost_micro_usd(usage, prices) == 10_035
    # +10 %: 11038.5 → rounded up to 11039
    assert charged_cost_micro_usd(usage, prices, Decimal("10")) == 11_039
    # -20 %: 8028 exactly
    assert charged_cost_micro_usd(usage, prices, Decimal("-20")) == 8_028
    # Reservation for 1000 prompt / 500 max output: 1000 * 3.75 + 500 * 15 = 11250
    assert max_cost_micro_usd(1000, 500, prices, Decimal("0")) == 11_250
    assert max_cost_micro_usd(1000, 500, prices, Decimal("10")) == 12_375


def test_it_rounds_a_fraction_of_a_micro_dollar_up():
    prices = Prices(
        input=Decimal("0.15"),
        output=Decimal("0.60"),
        cached_input=Decimal("0.075"),
        cache_write=Decimal("0.15"),
        reasoning=Decimal("0.60"),
    )

    # 7 * 0.15 = 1.05 → 2; 1 * 0.075 = 0.075 → 1
    assert list_cost_micro_usd(Usage(prompt_tokens=7), prices) == 2
    assert list_cost_micro_usd(Usage(prompt_tokens=1, cached_read_tokens=1), prices) == 1
    # 10 in + 3 out = 1.5 + 1.8 = 3.3 → 4; with a 0.001 % markup 3.300033 → 4
    usage = Usage(prompt_tokens=10, completion_tokens=3)
    assert list_cost_micro_usd(usage, prices) == 4
    assert charged_cost_micro_usd(usage, prices, Decimal("0.001")) == 4
    # 20 in = 3.0 exactly: no rounding; the smallest markup pushes it to 4
    assert list_cost_micro_usd(Usage(prompt_tokens=20), prices) == 3
    assert charged_cost_micro_usd(Usage(prompt_tokens=20), prices, Decimal("0.001")) == 4


def test_it_formats_and_converts_known_values():
    assert micro_usd_to_str(12_500_000) == "12.500000"
    assert micro_usd_to_str(60) == "0.000060"
    assert micro_usd_to_str(-1_500_001) == "-1.500001"
    assert per_million_from_per_token(1.5e-07) == Decimal("0.15")
    assert per_million_from_per_token(2.5e-06) == Decimal("2.5")
    assert per_million_from_per_token(0.0) == Decimal(0)
