"""Budget threshold alerts: recorded once per threshold, scope, owner and period."""

from __future__ import annotations

import time

import openai
import pytest

from billing.models import BudgetAlert
from billing.periods import current_period
from tests.support.http import HELLO, openai_sdk
from tests.support.money import output_priced_model
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e


def spend(client: openai.OpenAI, model, max_tokens: int) -> None:
    client.chat.completions.create(model=model.name, messages=HELLO, max_tokens=max_tokens)


def refuse(client: openai.OpenAI, model, max_tokens: int) -> None:
    with pytest.raises(openai.RateLimitError):
        spend(client, model, max_tokens)


def recorded(**filters) -> dict[int, BudgetAlert]:
    return {a.threshold_percent: a for a in BudgetAlert.objects.filter(**filters)}


def test_it_records_each_team_threshold_once(live_gateway, make_model, make_team, make_key):
    big = output_priced_model(make_model, output_tokens=300)  # 300 micro-USD a request
    small = output_priced_model(make_model, output_tokens=100)
    team = make_team(budget_micro_usd=1_000, alert_thresholds=[50, 100], timezone="Asia/Kolkata")
    alice = openai_sdk(live_gateway, make_key(team=team, name="alice").secret)
    bob = openai_sdk(live_gateway, make_key(team=team, name="bob").secret)
    mine = {"scope": "team", "owner_id": team.id}

    spend(alice, big, 300)  # 300: 30 %
    spend(bob, big, 300)  # 600: crosses 50 %
    wait_until(lambda: 50 in recorded(**mine))
    spend(alice, big, 300)  # 900: 90 %, nothing new
    refuse(bob, big, 300)  # 900 + 300 > 1000
    spend(bob, small, 100)  # 1000: crosses 100 %
    wait_until(lambda: 100 in recorded(**mine))
    refuse(alice, small, 1)
    refuse(bob, small, 100)
    time.sleep(0.3)  # anything recorded late would show now

    alerts = recorded(**mine)
    assert sorted(alerts) == [50, 100]
    assert BudgetAlert.objects.filter(**mine).count() == 2
    period = current_period("monthly", "Asia/Kolkata")
    for threshold, spent in [(50, 600), (100, 1_000)]:
        alert = alerts[threshold]
        assert alert.team_id == team.id
        assert alert.period_id == period.id
        assert alert.limit_micro_usd == 1_000
        assert alert.spent_micro_usd == spent  # recorded by the request that crossed it
        assert alert.delivered_at is None
    # The keys have no budgets of their own: no key alerts.
    assert not BudgetAlert.objects.filter(scope="key", team_id=team.id).exists()


def test_it_records_key_thresholds_with_the_teams_percentages(
    live_gateway, make_model, make_team, make_key
):
    big = output_priced_model(make_model, output_tokens=300)
    small = output_priced_model(make_model, output_tokens=100)
    team = make_team(alert_thresholds=[50, 100])  # no team budget
    issued = make_key(team=team, max_budget_micro_usd=400, budget_period="daily")
    client = openai_sdk(live_gateway, issued.secret)
    mine = {"scope": "key", "owner_id": issued.key.id}

    spend(client, big, 300)  # 300 of 400: crosses 50 %
    refuse(client, big, 300)
    spend(client, small, 100)  # 400: crosses 100 %
    refuse(client, small, 1)
    wait_until(lambda: len(recorded(**mine)) == 2)
    time.sleep(0.3)

    alerts = recorded(**mine)
    assert sorted(alerts) == [50, 100]
    assert [alerts[50].spent_micro_usd, alerts[100].spent_micro_usd] == [300, 400]
    assert alerts[50].period_id == current_period("daily", "UTC").id
    assert {a.team_id for a in alerts.values()} == {team.id}
    assert not BudgetAlert.objects.filter(scope="team", owner_id=team.id).exists()


def test_it_records_one_alert_per_threshold_crossed_in_one_step(
    live_gateway, make_model, make_team, make_key
):
    big = output_priced_model(make_model, output_tokens=900)
    team = make_team(budget_micro_usd=1_000, alert_thresholds=[25, 50, 80, 100])
    client = openai_sdk(live_gateway, make_key(team=team).secret)

    spend(client, big, 900)  # 0 → 900 crosses 25, 50 and 80 at once, not 100
    wait_until(lambda: len(recorded(scope="team", owner_id=team.id)) >= 3)
    time.sleep(0.3)

    alerts = recorded(scope="team", owner_id=team.id)
    assert sorted(alerts) == [25, 50, 80]
    assert {a.spent_micro_usd for a in alerts.values()} == {900}


def test_it_records_nothing_without_thresholds_or_for_other_teams(
    live_gateway, make_model, make_team, make_key
):
    big = output_priced_model(make_model, output_tokens=300)
    quiet = make_team(budget_micro_usd=500)  # a budget, but no thresholds
    watched = make_team(budget_micro_usd=10_000, alert_thresholds=[50])
    charlie = openai_sdk(live_gateway, make_key(team=quiet).secret)
    alice = openai_sdk(live_gateway, make_key(team=watched).secret)

    spend(charlie, big, 300)  # 60 % of charlie's team budget
    spend(alice, big, 300)  # 3 % of alice's
    time.sleep(0.5)

    assert not BudgetAlert.objects.filter(team_id__in=[quiet.id, watched.id]).exists()
