"""The management API for money: spend per team and key, and the ledger (JSON and CSV)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest

from billing.models import LedgerEntry
from tests.support.http import HELLO, assert_openai_error, openai_sdk, unique
from tests.support.money import output_priced_model, usd, usd_str

pytestmark = pytest.mark.e2e

MONEY_FIELDS = ("list_cost_usd", "charged_cost_usd")


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def kolkata_today() -> tuple[datetime, datetime]:
    tz = ZoneInfo("Asia/Kolkata")
    today = datetime.now(tz).date()
    start = datetime(today.year, today.month, today.day, tzinfo=tz)
    return start.astimezone(UTC), (start + timedelta(days=1)).astimezone(UTC)


@pytest.fixture
def admin(live_gateway):
    with live_gateway.admin() as client:
        yield client


def create_team(admin: httpx.Client, **fields) -> dict:
    response = admin.post("/teams", json={"name": unique("team"), **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


def create_key(admin: httpx.Client, team_id: int, **fields) -> dict:
    response = admin.post("/keys", json={"team_id": team_id, "name": unique("key"), **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


# --- spend -------------------------------------------------------------------------------------


def test_it_reports_team_and_key_spend_by_model(live_gateway, admin, make_model):
    cheap = output_priced_model(make_model, output_tokens=10)  # 1 micro-USD per output token
    dear = output_priced_model(make_model, output_tokens=40, output="3")
    team = create_team(admin, budget_usd="0.004500", budget_period="daily", timezone="Asia/Kolkata")
    alice = create_key(admin, team["id"], max_budget_usd="0.002", budget_period="weekly")
    bob = create_key(admin, team["id"])
    assert team["budget_usd"] == "0.004500" and alice["max_budget_usd"] == "0.002000"

    usages = []
    for secret, model in [
        (alice["key"], cheap),
        (alice["key"], cheap),
        (alice["key"], dear),
        (bob["key"], dear),
    ]:
        raw = openai_sdk(live_gateway, secret).chat.completions.with_raw_response.create(
            model=model.name, messages=[{"role": "user", "content": unique("q")}], max_tokens=100
        )
        usage = raw.parse().usage
        assert usage is not None
        usages.append((secret, model.name, usage))

    team_spend = admin.get(f"/teams/{team['id']}/spend").json()
    key_spend = admin.get(f"/keys/{alice['id']}/spend").json()

    # Team: daily in Kolkata; 10 + 10 + 120 + 120 = 260 micro-USD.
    start, end = kolkata_today()
    assert team_spend["scope"] == "team" and team_spend["id"] == team["id"]
    assert team_spend["period"] == "daily"
    assert parse_instant(team_spend["period_start"]) == start
    assert parse_instant(team_spend["period_end"]) == end
    assert team_spend["budget_usd"] == "0.004500"
    assert team_spend["spent_usd"] == "0.000260"
    assert team_spend["reserved_usd"] == "0.000000"
    assert team_spend["remaining_usd"] == "0.004240"
    by_model = {row["model"]: row for row in team_spend["by_model"]}
    assert [row["model"] for row in team_spend["by_model"]] == [dear.name, cheap.name]
    for name, count, cost in [(dear.name, 2, 240), (cheap.name, 2, 20)]:
        row = by_model[name]
        mine = [u for _, m, u in usages if m == name]
        assert row["requests"] == count
        assert row["prompt_tokens"] == sum(u.prompt_tokens for u in mine)
        assert row["completion_tokens"] == sum(u.completion_tokens for u in mine)
        assert row["cached_read_tokens"] == row["cache_write_tokens"] == 0
        assert row["reasoning_tokens"] == 0
        assert row["list_cost_usd"] == row["spent_usd"] == usd_str(cost)

    # Key: weekly (from Monday, in the team's timezone); alice's three requests only.
    monday = start - timedelta(days=datetime.now(ZoneInfo("Asia/Kolkata")).weekday())
    assert key_spend["scope"] == "key" and key_spend["id"] == alice["id"]
    assert key_spend["period"] == "weekly"
    assert parse_instant(key_spend["period_start"]) == monday
    assert parse_instant(key_spend["period_end"]) == monday + timedelta(days=7)
    assert key_spend["budget_usd"] == "0.002000"
    assert key_spend["spent_usd"] == "0.000140"
    assert key_spend["remaining_usd"] == "0.001860"
    assert [(r["model"], r["requests"], r["spent_usd"]) for r in key_spend["by_model"]] == [
        (dear.name, 1, "0.000120"),
        (cheap.name, 2, "0.000020"),
    ]


def test_it_reports_cached_reasoning_and_markup_in_the_breakdown(
    live_gateway, admin, make_model, make_team, make_key
):
    name = unique("reasoner")
    model = make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens=50;reasoning_tokens=20;cached_tokens=4",
        input_cost_per_million=Decimal("1"),
        cached_input_cost_per_million=Decimal("0.5"),
        output_cost_per_million=Decimal("2"),
        reasoning_cost_per_million=Decimal("3"),
    )
    team = make_team(markup_percent=Decimal("10"))
    issued = make_key(team=team)

    raw = openai_sdk(live_gateway, issued.secret).chat.completions.with_raw_response.create(
        model=model.name, messages=HELLO
    )
    usage = raw.parse().usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.completion_tokens_details is not None
    spend = admin.get(f"/keys/{issued.key.id}/spend").json()

    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens_details.reasoning_tokens == 20
    # (prompt - 4) * 1 + 4 * 0.5 + 30 * 2 + 20 * 3; exact in whole micro-USD.
    list_cost = (usage.prompt_tokens - 4) + 2 + 60 + 60
    charged = -(-list_cost * 110 // 100)  # +10 %, rounded up
    [row] = spend["by_model"]
    assert row["requests"] == 1
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["completion_tokens"] == 50
    assert row["cached_read_tokens"] == 4
    assert row["reasoning_tokens"] == 20
    assert row["list_cost_usd"] == usd_str(list_cost)
    assert row["spent_usd"] == spend["spent_usd"] == usd_str(charged)
    assert raw.headers["x-gateway-cost-usd"] == usd_str(charged)
    # No budget on this key: nothing to reserve against or remain.
    assert spend["budget_usd"] is None and spend["remaining_usd"] is None


def test_it_reports_zero_for_a_key_that_spent_nothing(admin, make_key):
    issued = make_key(max_budget_micro_usd=1_500_000, budget_period="total")

    spend = admin.get(f"/keys/{issued.key.id}/spend").json()

    assert spend["period"] == "total"
    assert spend["period_start"] is None and spend["period_end"] is None
    assert spend["budget_usd"] == "1.500000"
    assert spend["spent_usd"] == spend["reserved_usd"] == "0.000000"
    assert spend["remaining_usd"] == "1.500000"
    assert spend["by_model"] == []


def test_it_refuses_an_unknown_timezone_naming_the_field(admin):
    response = admin.post("/teams", json={"name": unique("team"), "timezone": "Mars/Olympus"})

    error = assert_openai_error(response, 400)
    assert error["param"] == "timezone", error
    assert "timezone" in error["message"].lower() or "Mars/Olympus" in error["message"], error


def test_it_answers_404_for_an_unknown_team_or_key(admin, make_key):
    missing = make_key().key.id + 1_000_000

    for path in (f"/teams/{missing}/spend", f"/keys/{missing}/spend"):
        error = assert_openai_error(admin.get(path), 404)
        assert error["code"] == "not_found", error
        assert str(missing) in error["message"], error


@pytest.mark.parametrize(
    "path", ["/teams/{team}/spend", "/keys/{key}/spend", "/ledger", "/ledger?format=csv"]
)
def test_it_refuses_callers_without_the_admin_token(live_gateway, make_key, path):
    issued = make_key()
    url = f"{live_gateway.url}/api/admin" + path.format(team=issued.key.team_id, key=issued.key.id)

    for headers in (
        {},
        {"authorization": f"Bearer {issued.secret}"},  # a virtual key is not an admin token
        {"authorization": "Bearer not-the-admin-token"},
        {"x-api-key": issued.secret},
    ):
        response = httpx.get(url, headers=headers, timeout=10)
        error = assert_openai_error(response, 401)
        assert issued.secret not in response.text
        assert error["code"] == "invalid_admin_token", error


# --- the ledger ----------------------------------------------------------------------------------


@pytest.fixture
def traffic(live_gateway, make_model, make_team, make_key):
    """Alice (two models, one failing), bob in her team, charlie in another: newest last."""
    first = output_priced_model(make_model, output_tokens=10)
    second = output_priced_model(make_model, output_tokens=30, output="2")
    broken = output_priced_model(make_model, output_tokens=5, controls=";status=400")
    team = make_team()
    alice = make_key(team=team, name="alice")
    bob = make_key(team=team, name="bob")
    charlie = make_key(name="charlie")
    order = []
    for issued, model in [
        (alice, first),
        (alice, second),
        (bob, first),
        (alice, broken),
        (charlie, first),
        (alice, first),
    ]:
        try:
            raw = openai_sdk(live_gateway, issued.secret).chat.completions.with_raw_response.create(
                model=model.name, messages=HELLO
            )
            request_id = raw.headers["x-request-id"]
        except openai.APIStatusError as exc:
            assert exc.status_code == 400, exc
            request_id = exc.response.headers["x-request-id"]
        order.append((request_id, issued, model))
    return {
        "team": team,
        "alice": alice,
        "bob": bob,
        "charlie": charlie,
        "first": first,
        "second": second,
        "broken": broken,
        "order": order,
    }


def ids(page: dict) -> list[str]:
    return [item["request_id"] for item in page["items"]]


def test_it_lists_the_ledger_newest_first_with_filters(admin, traffic):
    order = traffic["order"]
    alice, team, first = traffic["alice"], traffic["team"], traffic["first"]

    by_team = admin.get("/ledger", params={"team_id": team.id}).json()
    by_key = admin.get("/ledger", params={"key_id": alice.key.id}).json()
    by_model = admin.get("/ledger", params={"model": first.name, "team_id": team.id}).json()
    errors = admin.get("/ledger", params={"status": "error", "team_id": team.id}).json()
    successes = admin.get("/ledger", params={"status": "success", "key_id": alice.key.id}).json()

    newest_first = [rid for rid, _, _ in reversed(order)]
    in_team = [rid for rid, who, _ in reversed(order) if who.key.team_id == team.id]
    assert ids(by_team) == in_team and by_team["count"] == 5
    assert ids(by_key) == [rid for rid, who, _ in reversed(order) if who is alice]
    assert ids(by_model) == [
        rid for rid, who, m in reversed(order) if m is first and who.key.team_id == team.id
    ]
    assert ids(errors) == [order[3][0]]
    assert ids(successes) == [order[5][0], order[1][0], order[0][0]]
    assert set(ids(admin.get("/ledger").json())) >= set(newest_first)

    [error_row] = errors["items"]
    assert error_row["status"] == "error"
    assert error_row["charged_cost_usd"] == error_row["list_cost_usd"] == "0.000000"
    row = next(i for i in by_key["items"] if i["request_id"] == order[1][0])
    assert row["model"] == traffic["second"].name
    assert row["key_id"] == alice.key.id and row["team_id"] == team.id
    assert row["completion_tokens"] == 30
    assert row["charged_cost_usd"] == row["list_cost_usd"] == "0.000060"
    assert row["status"] == "success" and row["http_status"] == 200


def test_it_filters_the_ledger_by_time(admin, traffic):
    team = traffic["team"]
    items = admin.get("/ledger", params={"team_id": team.id}).json()["items"]
    middle = items[2]["started_at"]  # newest first: two rows are newer than this one

    since = admin.get("/ledger", params={"team_id": team.id, "since": middle}).json()
    until = admin.get("/ledger", params={"team_id": team.id, "until": middle}).json()
    both = admin.get(
        "/ledger",
        params={"team_id": team.id, "since": items[3]["started_at"], "until": middle},
    ).json()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    assert ids(since) == [i["request_id"] for i in items[:3]]  # since is inclusive
    assert ids(until) == [i["request_id"] for i in items[3:]]  # until is exclusive
    assert ids(both) == [items[3]["request_id"]]
    assert admin.get("/ledger", params={"team_id": team.id, "since": future}).json()["count"] == 0


def test_it_pages_through_the_ledger(admin, traffic):
    team = traffic["team"]
    everything = ids(admin.get("/ledger", params={"team_id": team.id}).json())

    pages = [
        admin.get("/ledger", params={"team_id": team.id, "limit": 2, "offset": offset}).json()
        for offset in (0, 2, 4, 6)
    ]

    assert [p["count"] for p in pages] == [5, 5, 5, 5]
    assert [(p["limit"], p["offset"]) for p in pages] == [(2, 0), (2, 2), (2, 4), (2, 6)]
    assert [len(p["items"]) for p in pages] == [2, 2, 1, 0]
    assert [rid for p in pages for rid in ids(p)] == everything
    assert assert_openai_error(admin.get("/ledger", params={"limit": 0}), 400)["param"] == "limit"
    assert (
        assert_openai_error(admin.get("/ledger", params={"status": "paid"}), 400)["param"]
        == "status"
    )


def test_it_exports_the_ledger_as_csv(admin, traffic):
    alice = traffic["alice"]
    as_json = admin.get("/ledger", params={"key_id": alice.key.id}).json()

    response = admin.get("/ledger", params={"key_id": alice.key.id, "format": "csv"})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    header = next(csv.reader(io.StringIO(response.text)))
    assert {"request_id", "key_id", "team_id", "model", "status", *MONEY_FIELDS} <= set(header)
    assert len(rows) == as_json["count"] == 4
    for row, item in zip(rows, as_json["items"], strict=True):
        assert row["request_id"] == item["request_id"]
        assert row["model"] == item["model"]
        assert row["status"] == item["status"]
        assert int(row["key_id"]) == alice.key.id
        assert int(row["prompt_tokens"]) == item["prompt_tokens"]
        assert int(row["completion_tokens"]) == item["completion_tokens"]
        for field in MONEY_FIELDS:
            assert row[field] == item[field]
            usd(row[field])  # a plain decimal string, never a float
    total = sum(Decimal(row["charged_cost_usd"]) for row in rows)
    ledger = sum(r.charged_cost_micro_usd for r in LedgerEntry.objects.filter(key_id=alice.key.id))
    assert total * 1_000_000 == ledger == 10 + 60 + 0 + 10


def test_it_exports_every_matching_row_not_one_page(admin, traffic):
    response = admin.get(
        "/ledger", params={"team_id": traffic["team"].id, "format": "csv", "limit": 1}
    )

    assert len(list(csv.DictReader(io.StringIO(response.text)))) == 5
