"""Budgets cannot be overspent: admission reserves the most a request can cost.

The models here price prompts at zero and completions at a whole micro-dollar amount
per token (see `output_priced_model`), so every reservation and every charge below is
computed by hand: reservation = max_tokens * output price, cost = output_tokens * price.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from zoneinfo import ZoneInfo

import openai
import pytest
from openai import AsyncOpenAI

from billing.models import LedgerEntry
from tests.support.http import HELLO, openai_sdk, sdk_error_body, unique
from tests.support.money import iso_instants, output_priced_model, upstream_name, usd, usd_str

pytestmark = pytest.mark.e2e


def next_month_utc() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)


def next_local_midnight(tz: str) -> datetime:
    local = datetime.now(ZoneInfo(tz))
    tomorrow = local.date() + timedelta(days=1)
    return datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=ZoneInfo(tz)).astimezone(
        UTC
    )


def refusal(client: openai.OpenAI, model: str, max_tokens: int) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=model, messages=HELLO, max_tokens=max_tokens)
    return caught.value


def cost_of(client: openai.OpenAI, model: str, max_tokens: int) -> int:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=HELLO, max_tokens=max_tokens
    )
    raw.parse()
    return usd(raw.headers["x-gateway-cost-usd"])


def test_it_admits_until_the_reservation_would_pass_the_key_budget(
    live_gateway, make_model, make_key
):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    alice = make_key(max_budget_micro_usd=450)  # monthly, the default
    client = openai_sdk(live_gateway, alice.secret)

    # Each request reserves 100 * 2 = 200 and costs 50 * 2 = 100 micro-USD:
    # spent 0, 100, 200 leave room for a 200 reservation (200 + 200 = 400 <= 450) ...
    assert [cost_of(client, model.name, 100) for _ in range(3)] == [100, 100, 100]
    # ... spent 300 does not (300 + 200 = 500 > 450).
    refused = refusal(client, model.name, 100)

    assert refused.status_code == 429
    error = sdk_error_body(refused)
    assert error["type"] == "insufficient_quota", error
    assert error["code"] == "key_budget_exceeded", error
    message = error["message"]
    assert "key" in message.lower() and "team" not in message.lower(), message
    assert "monthly" in message, message
    assert "$0.000450" in message, message  # the limit
    assert "$0.000300" in message, message  # what is spent
    assert "$0.000200" in message, message  # what this request needed
    assert iso_instants(message) == [next_month_utc()], message
    assert refused.response.headers["x-request-id"]


def test_it_admits_a_reservation_that_exactly_fills_the_budget(live_gateway, make_model, make_key):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    alice = make_key(max_budget_micro_usd=450)
    client = openai_sdk(live_gateway, alice.secret)
    assert [cost_of(client, model.name, 100) for _ in range(3)] == [100, 100, 100]

    refusal(client, model.name, 76)  # 300 + 152 > 450
    assert cost_of(client, model.name, 75) == 100  # 300 + 150 = 450: fits exactly
    refusal(client, model.name, 26)  # 400 + 52 > 450
    assert cost_of(client, model.name, 25) == 50  # 400 + 50 = 450; the mock stops at 25 tokens
    refused = refusal(client, model.name, 1)  # 450 + 2 > 450

    assert "$0.000450 spent" in sdk_error_body(refused)["message"], sdk_error_body(refused)
    assert LedgerEntry.objects.filter(key_id=alice.key.id).count() == 5


def test_it_leaves_no_ledger_row_and_calls_no_provider_for_a_refused_request(
    live_gateway, mock_upstream, make_model, make_key
):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    alice = make_key(max_budget_micro_usd=250)
    client = openai_sdk(live_gateway, alice.secret)
    assert cost_of(client, model.name, 100) == 100
    calls_before = mock_upstream.calls(upstream_name(model))
    rows_before = LedgerEntry.objects.filter(key_id=alice.key.id).count()

    refused = [refusal(client, model.name, 100) for _ in range(3)]  # 100 + 200 > 250

    assert calls_before == 1
    assert mock_upstream.calls(upstream_name(model)) == calls_before
    assert LedgerEntry.objects.filter(key_id=alice.key.id).count() == rows_before == 1
    request_ids = [r.response.headers["x-request-id"] for r in refused]
    assert len(set(request_ids)) == 3
    assert not LedgerEntry.objects.filter(request_id__in=request_ids).exists()
    # The refusals reserved nothing: the remaining 150 still admits a 150 reservation.
    assert cost_of(client, model.name, 75) == 100


def test_it_shares_a_team_budget_between_the_teams_keys(
    live_gateway, make_model, make_team, make_key
):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    team = make_team(budget_micro_usd=450, budget_period="daily", timezone="Asia/Kolkata")
    alice = openai_sdk(live_gateway, make_key(team=team, name="alice").secret)
    bob = openai_sdk(live_gateway, make_key(team=team, name="bob").secret)
    charlie = openai_sdk(live_gateway, make_key(name="charlie").secret)  # another team, no budget

    assert cost_of(alice, model.name, 100) == 100
    assert cost_of(bob, model.name, 100) == 100
    assert cost_of(alice, model.name, 100) == 100
    refused_bob = refusal(bob, model.name, 100)  # the team spent 300: 300 + 200 > 450
    refused_alice = refusal(alice, model.name, 100)

    for refused in (refused_bob, refused_alice):
        error = sdk_error_body(refused)
        assert error["type"] == "insufficient_quota", error
        assert error["code"] == "team_budget_exceeded", error
        message = error["message"]
        assert "team" in message.lower(), message
        assert "daily" in message, message
        assert "$0.000450" in message and "$0.000300" in message, message
        # Daily in Kolkata: it resets at the next midnight there (18:30 UTC).
        assert iso_instants(message) == [next_local_midnight("Asia/Kolkata")], message
    # An outsider's key is not touched by alice's team budget.
    assert cost_of(charlie, model.name, 100) == 100


def test_it_names_the_key_budget_when_it_is_tighter_than_the_team_budget(
    live_gateway, make_model, make_team, make_key
):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    team = make_team(budget_micro_usd=1_000_000)
    alice = openai_sdk(live_gateway, make_key(team=team, max_budget_micro_usd=250).secret)

    assert cost_of(alice, model.name, 100) == 100
    refused = refusal(alice, model.name, 100)

    assert sdk_error_body(refused)["code"] == "key_budget_exceeded", sdk_error_body(refused)
    assert "$0.000250" in sdk_error_body(refused)["message"], sdk_error_body(refused)


def test_it_says_a_total_credit_does_not_reset(live_gateway, make_model, make_key):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    alice = openai_sdk(
        live_gateway, make_key(max_budget_micro_usd=250, budget_period="total").secret
    )

    assert cost_of(alice, model.name, 100) == 100
    refused = refusal(alice, model.name, 100)

    error = sdk_error_body(refused)
    assert error["code"] == "key_budget_exceeded", error
    assert "does not reset" in error["message"], error
    assert "$0.000250" in error["message"] and "$0.000100" in error["message"], error
    assert iso_instants(error["message"]) == [], error


def test_it_refuses_a_request_that_could_never_fit(
    live_gateway, mock_upstream, make_model, make_key
):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    alice = openai_sdk(live_gateway, make_key(max_budget_micro_usd=199).secret)

    refused = refusal(alice, model.name, 100)  # 200 > 199 before anything is spent

    assert "$0.000000 spent" in sdk_error_body(refused)["message"], sdk_error_body(refused)
    assert "$0.000200" in sdk_error_body(refused)["message"], sdk_error_body(refused)
    assert mock_upstream.calls(upstream_name(model)) == 0


@pytest.mark.parametrize("markup", ["12.5", "-40", "0.001"])
def test_it_charges_the_team_markup_on_top_of_the_list_cost(
    live_gateway, make_model, make_team, make_key, markup
):
    name = unique("markup")
    model = make_model(name=name, provider_model=f"openai/{name};output_tokens=7")  # 1.00 / 2.00
    team = make_team(markup_percent=Decimal(markup))
    alice = openai_sdk(live_gateway, make_key(team=team).secret)

    raw = alice.chat.completions.with_raw_response.create(model=model.name, messages=HELLO)
    usage = raw.parse().usage
    assert usage is not None
    row = LedgerEntry.objects.get(request_id=raw.headers["x-request-id"])

    exact_list = usage.prompt_tokens * Decimal("1.00") + usage.completion_tokens * Decimal("2.00")
    expected_list = int(exact_list.to_integral_value(rounding=ROUND_CEILING))
    exact_charged = exact_list * (100 + Decimal(markup)) / 100
    expected_charged = int(exact_charged.to_integral_value(rounding=ROUND_CEILING))
    assert usage.completion_tokens == 7
    assert (row.prompt_tokens, row.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert row.list_cost_micro_usd == expected_list
    assert row.charged_cost_micro_usd == expected_charged
    assert (row.charged_cost_micro_usd > row.list_cost_micro_usd) == (Decimal(markup) > 0)
    assert raw.headers["x-gateway-cost-usd"] == usd_str(expected_charged)


def test_it_reserves_with_the_markup_applied(live_gateway, make_model, make_team, make_key):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    team = make_team(markup_percent=Decimal("100"))
    alice = openai_sdk(live_gateway, make_key(team=team, max_budget_micro_usd=399).secret)

    refused = refusal(alice, model.name, 100)  # 100 * 2 * 2 = 400 > 399

    assert "$0.000400" in sdk_error_body(refused)["message"], sdk_error_body(refused)
    assert cost_of(alice, model.name, 99) == 200  # 396 fits; charged 50 * 2 * 2


def test_it_keeps_the_budget_counters_equal_to_the_ledger(
    live_gateway, make_model, make_team, make_key
):
    team = make_team(budget_micro_usd=20_000)
    alice_issued = make_key(team=team, name="alice", max_budget_micro_usd=10_000)
    alice = openai_sdk(live_gateway, alice_issued.secret)
    bob = openai_sdk(live_gateway, make_key(team=team, name="bob").secret)
    models = [output_priced_model(make_model, output_tokens=n) for n in (37, 120, 5)]
    failing = output_priced_model(make_model, output_tokens=9, controls=";status=400")

    for model in models:
        alice.chat.completions.create(model=model.name, messages=HELLO, max_tokens=500)
    stream = alice.chat.completions.create(
        model=models[0].name, messages=HELLO, max_tokens=500, stream=True
    )
    assert sum(1 for _ in stream) > 1
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model=failing.name, messages=HELLO, max_tokens=500)
    alice.chat.completions.create(model=models[1].name, messages=HELLO, max_tokens=60)

    rows = list(LedgerEntry.objects.filter(key_id=alice_issued.key.id))
    spent = sum(r.charged_cost_micro_usd for r in rows)
    assert len(rows) == 6
    assert spent == 37 + 120 + 5 + 37 + 0 + 60
    with live_gateway.admin() as admin:
        key_spend = admin.get(f"/keys/{alice_issued.key.id}/spend").json()
        team_spend = admin.get(f"/teams/{team.id}/spend").json()
    assert key_spend["spent_usd"] == team_spend["spent_usd"] == usd_str(spent)
    assert key_spend["reserved_usd"] == team_spend["reserved_usd"] == "0.000000"
    assert key_spend["remaining_usd"] == usd_str(10_000 - spent)
    assert team_spend["remaining_usd"] == usd_str(20_000 - spent)

    # What admission enforces agrees to the micro-dollar: one token more than the rest of
    # the key budget is refused, naming the ledger's spend and nothing reserved ...
    refused = refusal(alice, models[2].name, 10_000 - spent + 1)
    assert f"${usd_str(spent)} spent and $0.000000 reserved" in sdk_error_body(refused)["message"]
    # ... the same on the team counter, through bob's key ...
    refused = refusal(bob, models[2].name, 20_000 - spent + 1)
    assert sdk_error_body(refused)["code"] == "team_budget_exceeded"
    assert f"${usd_str(spent)} spent and $0.000000 reserved" in sdk_error_body(refused)["message"]
    # ... and exactly the rest is admitted.
    assert cost_of(alice, models[2].name, 10_000 - spent) == 5


def test_it_never_lets_concurrent_requests_overspend(live_gateway, make_model, make_key):
    model = output_priced_model(make_model, output_tokens=50, output="2")
    issued = make_key(max_budget_micro_usd=1_000)

    async def burst() -> list[int | None]:
        client = AsyncOpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

        async def one() -> int | None:
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model.name, messages=HELLO, max_tokens=100
                )
            except openai.RateLimitError as exc:
                assert sdk_error_body(exc)["code"] == "key_budget_exceeded", sdk_error_body(exc)
                return None
            return usd(raw.headers["x-gateway-cost-usd"])

        try:
            return list(await asyncio.gather(*(one() for _ in range(14))))
        finally:
            await client.close()

    results = asyncio.run(burst())

    charged = [c for c in results if c is not None]
    # Each reserves 200: at least 1000 // 200 fit at once; settling at 100 frees room for
    # more, but never past 9 (spent 900 + 200 > 1000).
    assert 5 <= len(charged) <= 9, results
    total = sum(r.charged_cost_micro_usd for r in LedgerEntry.objects.filter(key_id=issued.key.id))
    assert total == sum(charged) <= 1_000
    with live_gateway.admin() as admin:
        spend = admin.get(f"/keys/{issued.key.id}/spend").json()
    assert spend["reserved_usd"] == "0.000000"
    assert spend["spent_usd"] == usd_str(total)


def test_it_keeps_spend_within_the_budget_when_the_provider_counts_more_prompt_tokens(
    live_gateway, make_model, make_key
):
    """The budget is a hard limit, whoever counts the tokens.

    The gateway reserves on its own estimate of the prompt (litellm's tokenizer), but
    bills the provider's count. A long run of one letter is ~500 tokens to tiktoken and
    1004 to the mock upstream (4 bytes a token), as a provider with another tokenizer
    would report. Refusing the request, or admitting it only with room for what it can
    really cost, both keep the key within its budget; overspending it does not.
    """
    name = unique("prompt-priced")
    model = make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens=1",
        input_cost_per_million=Decimal("1"),
        output_cost_per_million=Decimal("0"),
    )
    issued = make_key(max_budget_micro_usd=700)
    client = openai_sdk(live_gateway, issued.secret)

    try:
        client.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "a" * 4000}], max_tokens=1
        )
    except openai.RateLimitError as exc:
        assert sdk_error_body(exc)["code"] == "key_budget_exceeded", sdk_error_body(exc)

    rows = LedgerEntry.objects.filter(key_id=issued.key.id)
    spent = sum(r.charged_cost_micro_usd for r in rows)
    assert spent <= 700, [(r.prompt_tokens, r.charged_cost_micro_usd) for r in rows]
