"""GET /v1/key: a key's own limits, budget, spend this period and reset time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.support.http import HELLO, assert_openai_error, openai_sdk
from tests.support.money import output_priced_model

pytestmark = pytest.mark.e2e


def key_info(live_gateway, secret: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return httpx.get(f"{live_gateway.v1}/key", headers=headers, timeout=10)


def instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def next_local_midnight(tz: str) -> datetime:
    tomorrow = datetime.now(ZoneInfo(tz)).date() + timedelta(days=1)
    return datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=ZoneInfo(tz)).astimezone(
        UTC
    )


def next_month_in(tz: str) -> datetime:
    now = datetime.now(ZoneInfo(tz))
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=ZoneInfo(tz)).astimezone(UTC)


def test_it_reports_the_callers_limits_budget_and_spend(
    live_gateway, make_model, make_team, make_key
):
    model = output_priced_model(make_model, output_tokens=25, output="2")  # 50 micro-USD each
    team = make_team(
        name="alice's team",
        budget_micro_usd=5_000,
        budget_period="daily",
        timezone="America/New_York",
        rpm_limit=100,
        tpm_limit=100_000,
    )
    alice = make_key(
        team=team,
        name="alice",
        max_budget_micro_usd=1_000,
        rpm_limit=10,
        tpm_limit=20_000,
        allowed_models=[model.name],
    )
    client = openai_sdk(live_gateway, alice.secret)
    for _ in range(3):
        client.chat.completions.create(model=model.name, messages=HELLO, max_tokens=100)

    response = key_info(live_gateway, alice.secret)

    assert response.status_code == 200, response.text
    info = response.json()
    assert info["id"] == alice.key.id
    assert info["name"] == "alice"
    assert info["team"] == {"id": team.id, "name": "alice's team"}
    assert info["models"] == [model.name]
    assert info["expires_at"] is None
    assert info["rate_limits"] == {"rpm": 10, "tpm": 20_000, "team_rpm": 100, "team_tpm": 100_000}
    # The key's budget: monthly (the default), in the team's timezone.
    budget = info["budget"]
    assert budget["limit_usd"] == "0.001000"
    assert budget["period"] == "monthly"
    assert budget["spent_usd"] == "0.000150"
    assert budget["reserved_usd"] == "0.000000"
    assert budget["remaining_usd"] == "0.000850"
    assert instant(budget["resets_at"]) == next_month_in("America/New_York")
    # The team's budget: daily in New York.
    team_budget = info["team_budget"]
    assert team_budget["limit_usd"] == "0.005000"
    assert team_budget["period"] == "daily"
    assert team_budget["spent_usd"] == "0.000150"
    assert team_budget["remaining_usd"] == "0.004850"
    assert instant(team_budget["resets_at"]) == next_local_midnight("America/New_York")
    # Spend this (key budget) period, by model.
    spend = info["spend"]
    assert spend["period"] == "monthly"
    assert spend["spent_usd"] == "0.000150"
    assert instant(spend["resets_at"]) == next_month_in("America/New_York")
    [row] = spend["by_model"]
    assert row["model"] == model.name
    assert row["requests"] == 3
    assert row["completion_tokens"] == 75
    assert row["spent_usd"] == row["list_cost_usd"] == "0.000150"


def test_it_shows_each_key_only_its_own_numbers(live_gateway, make_model, make_team, make_key):
    model = output_priced_model(make_model, output_tokens=10)
    alice_team = make_team(budget_micro_usd=9_000)
    alice = make_key(team=alice_team, name="alice", max_budget_micro_usd=5_000)
    bob = make_key(team=alice_team, name="bob", rpm_limit=7)
    charlie_team = make_team(name="charlie's team")
    charlie = make_key(team=charlie_team, name="charlie")
    for _ in range(4):
        openai_sdk(live_gateway, alice.secret).chat.completions.create(
            model=model.name, messages=HELLO, max_tokens=50
        )
    openai_sdk(live_gateway, charlie.secret).chat.completions.create(
        model=model.name, messages=HELLO, max_tokens=50
    )

    for_alice = key_info(live_gateway, alice.secret).json()
    for_bob = key_info(live_gateway, bob.secret).json()
    for_charlie = key_info(live_gateway, charlie.secret).json()

    assert for_alice["spend"]["spent_usd"] == "0.000040"
    # Bob shares alice's team budget but has spent nothing himself.
    assert for_bob["id"] == bob.key.id and for_bob["name"] == "bob"
    assert for_bob["spend"]["spent_usd"] == "0.000000"
    assert for_bob["spend"]["by_model"] == []
    assert for_bob["budget"] is None
    assert for_bob["team_budget"]["spent_usd"] == "0.000040"
    assert for_bob["rate_limits"] == {"rpm": 7, "tpm": None, "team_rpm": None, "team_tpm": None}
    # Charlie, in another team, sees his own key and spend, nothing of alice's.
    assert for_charlie["id"] == charlie.key.id
    assert for_charlie["team"] == {"id": charlie_team.id, "name": "charlie's team"}
    assert for_charlie["spend"]["spent_usd"] == "0.000010"
    assert [r["requests"] for r in for_charlie["spend"]["by_model"]] == [1]
    assert for_charlie["budget"] is None and for_charlie["team_budget"] is None
    assert for_charlie["models"] is None


def test_it_reports_a_total_credit_that_never_resets(live_gateway, make_key):
    issued = make_key(max_budget_micro_usd=2_500_000, budget_period="total")

    info = key_info(live_gateway, issued.secret).json()

    assert info["budget"]["period"] == "total"
    assert info["budget"]["resets_at"] is None
    assert info["budget"]["remaining_usd"] == "2.500000"
    assert info["spend"]["resets_at"] is None


def test_it_refuses_a_missing_or_wrong_key(live_gateway, make_key):
    issued = make_key()
    revoked = make_key()
    from accounts import services as account_services

    account_services.key_revoke(key=revoked.key)

    assert assert_openai_error(key_info(live_gateway, None), 401)["code"] == "missing_api_key"
    wrong = assert_openai_error(key_info(live_gateway, issued.secret[:-2] + "xx"), 401)
    assert wrong["code"] == "invalid_api_key"
    # The admin token is not a virtual key.
    admin_token = live_gateway.env["GATEWAY_ADMIN_TOKEN"]
    assert (
        assert_openai_error(key_info(live_gateway, admin_token), 401)["code"] == "invalid_api_key"
    )
    assert (
        assert_openai_error(key_info(live_gateway, revoked.secret), 401)["code"]
        == "invalid_api_key"
    )
