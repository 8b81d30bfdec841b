"""Reconciliation with the providers' bills: imports, the report, the API, the page, drift alerts.

The fixtures under fixtures/ are written from the providers' documented API results
(OpenAI's Costs and Usage APIs, Anthropic's Admin API cost report) for February 2026.
The ledger rows are built to match them to the micro-dollar, except where a test
misprices a model on purpose.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.core.management import CommandError, call_command
from django.test import Client

from accounts import services as account_services
from accounts.models import Membership, PlatformRole, StaffRole, TeamRole
from billing import notifications
from billing.models import DriftAlert, EmailNotification, LedgerEntry, ProviderCost
from billing.provider_exports import parse_export
from billing.selectors import provider_reconciliation

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI_COSTS = FIXTURES / "openai_costs_2026-02.json"
OPENAI_USAGE = FIXTURES / "openai_usage_2026-02.json"
ANTHROPIC_COSTS = FIXTURES / "anthropic_cost_report_2026-02.json"
FEBRUARY = (date(2026, 2, 1), date(2026, 3, 1))
MINI = "gpt-4o-mini-2024-07-18"
MISPRICED_DAYS = {date(2026, 2, d) for d in (10, 11, 12)}


def import_file(provider: str, path: Path, period: str = "2026-02") -> str:
    out = StringIO()
    call_command("billing_reconcile_import", provider, str(path), period=period, stdout=out)
    return out.getvalue()


def costs_snapshot() -> list[tuple[Any, ...]]:
    return list(
        ProviderCost.objects.order_by("provider", "day", "model").values_list(
            "provider", "model", "day", "cost_usd", "input_tokens", "output_tokens", "updated_at"
        )
    )


def ledger_matching(provider: str, path: Path, *, mispriced: str = "", by: str = "1") -> None:
    """Two ledger rows per model and day whose list costs add up to the bill exactly.

    `mispriced` on MISPRICED_DAYS is recorded at `by` times the bill (a wrong price).
    """
    parsed = parse_export(provider, path.read_bytes())
    rows = []
    for (model, day), figures in parsed.figures.items():
        assert figures.cost_usd is not None
        micro = int(figures.cost_usd * 1_000_000)
        assert Decimal(micro) == figures.cost_usd * 1_000_000  # the fixture is micro-exact
        if model == mispriced and day in MISPRICED_DAYS:
            micro = int(micro * Decimal(by))
        started = datetime(day.year, day.month, day.day, tzinfo=UTC)
        # One row in the first minute and one in the last: the day is UTC's, both ends.
        for n, (at, cost) in enumerate(
            ((started, micro // 3), (started + timedelta(hours=23, minutes=59), micro - micro // 3))
        ):
            rows.append(
                LedgerEntry(
                    request_id=f"req_{provider}_{model}_{day}_{n}",
                    team_id=1,
                    endpoint="chat",
                    model=f"public-{model}",
                    provider=provider,
                    provider_model=f"{provider}/{model}",
                    list_cost_micro_usd=cost,
                    charged_cost_micro_usd=cost,
                    status="success",
                    started_at=at,
                    ended_at=at,
                )
            )
    # Outside February and another provider: neither may leak into the report.
    for at in (datetime(2026, 1, 31, 23, 59, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)):
        rows.append(
            LedgerEntry(
                request_id=f"req_edge_{provider}_{at:%d}",
                team_id=1,
                endpoint="chat",
                model="x",
                provider=provider,
                provider_model=f"{provider}/{MINI}",
                list_cost_micro_usd=999_999,
                status="success",
                started_at=at,
                ended_at=at,
            )
        )
    LedgerEntry.objects.bulk_create(rows)


# --- imports -------------------------------------------------------------------------------------


def test_it_imports_openai_costs_per_model_and_day_exactly() -> None:
    output = import_file("openai", OPENAI_COSTS)

    assert "Imported openai costs for 2026-02-01 to 2026-02-28: 56 model-days" in output
    assert ProviderCost.objects.filter(provider="openai").count() == 56  # 28 days x 2 models
    first = ProviderCost.objects.get(provider="openai", model=MINI, day=date(2026, 2, 1))
    # input 0.0412 + output 0.1035, summed as decimals: no float crept in.
    assert first.cost_usd == Decimal("0.1447")
    last = ProviderCost.objects.get(
        provider="openai", model="gpt-4o-2024-08-06", day=date(2026, 2, 28)
    )
    assert last.cost_usd == Decimal("1.2075") + Decimal("3.4410") + 2 * 27 * Decimal("0.0125")


def test_it_imports_openai_usage_tokens_beside_the_costs() -> None:
    import_file("openai", OPENAI_COSTS)
    import_file("openai", OPENAI_USAGE)

    row = ProviderCost.objects.get(provider="openai", model=MINI, day=date(2026, 2, 2))
    assert (row.cost_usd, row.input_tokens, row.output_tokens) == (
        Decimal("0.1447") + 2 * Decimal("0.0125"),
        121_000,
        45_500,
    )


def test_it_imports_the_anthropic_cost_report_with_cents_as_decimal_strings() -> None:
    import_file("anthropic", ANTHROPIC_COSTS)

    row = ProviderCost.objects.get(
        provider="anthropic", model="claude-sonnet-4-20250514", day=date(2026, 2, 1)
    )
    # "215.4375" + "612.9000" + "18.225" cents.
    assert row.cost_usd == Decimal("8.465625")
    assert ProviderCost.objects.filter(provider="anthropic").count() == 56


def test_it_changes_nothing_when_the_same_file_is_imported_again() -> None:
    import_file("openai", OPENAI_COSTS)
    import_file("anthropic", ANTHROPIC_COSTS)
    before = costs_snapshot()

    again = import_file("openai", OPENAI_COSTS)
    import_file("anthropic", ANTHROPIC_COSTS)

    assert "already imported" in again and "nothing changed" in again
    assert costs_snapshot() == before  # not even updated_at moved


def test_it_replaces_a_day_with_a_newer_export_of_it_instead_of_adding() -> None:
    import_file("openai", OPENAI_COSTS)
    document = json.loads(OPENAI_COSTS.read_text())
    document["data"] = document["data"][:1]
    document["data"][0]["results"][0]["amount"]["value"] = 1  # corrected mini input
    newer = FIXTURES.parent / "tmp_newer.json"
    newer.write_text(json.dumps(document))
    try:
        import_file("openai", newer)
    finally:
        newer.unlink()

    row = ProviderCost.objects.get(provider="openai", model=MINI, day=date(2026, 2, 1))
    assert row.cost_usd == Decimal("1.1035")
    assert ProviderCost.objects.filter(provider="openai").count() == 56


@pytest.mark.parametrize(
    ("provider", "mutate", "place"),
    [
        (
            "openai",
            lambda d: d["data"][3]["results"][1]["amount"].update(value="a lot"),
            "data[3].results[1].amount.value",
        ),
        (
            "openai",
            lambda d: d["data"][5]["results"][2].pop("line_item"),
            "data[5].results[2].line_item",
        ),
        (
            "anthropic",
            lambda d: d["data"][7]["results"][0].update(amount=12.5),
            "data[7].results[0].amount",
        ),
        (
            "anthropic",
            lambda d: d["data"][2].update(ending_at="2026-02-05T00:00:00Z"),
            "data[2]",
        ),
    ],
)
def test_it_imports_nothing_from_a_bad_file_and_names_the_place(
    provider: str, mutate: Any, place: str, tmp_path: Path
) -> None:
    source = OPENAI_COSTS if provider == "openai" else ANTHROPIC_COSTS
    document = json.loads(source.read_text())
    mutate(document)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))

    with pytest.raises(CommandError) as caught:
        import_file(provider, bad)

    assert f"bad.json: {place}:" in str(caught.value)
    assert "Nothing was imported" in str(caught.value)
    assert not ProviderCost.objects.exists()  # the good buckets before the bad one too


def test_it_names_the_line_of_a_file_that_is_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "data": [\n    {"start_time": 1,,}\n  ]\n}\n')
    with pytest.raises(CommandError, match=r"line 3 column"):
        import_file("openai", bad)


def test_it_refuses_a_file_with_days_outside_the_period() -> None:
    with pytest.raises(CommandError, match=r"data\[0\]: the bucket of 2026-02-01 is outside"):
        import_file("openai", OPENAI_COSTS, period="2026-03")
    assert not ProviderCost.objects.exists()


# --- the report and the drift alerts -------------------------------------------------------------


def test_a_fixture_month_with_one_mispriced_model_flags_exactly_that_model_and_those_days(
    settings: Any,
) -> None:
    settings.GATEWAY_RECONCILIATION_DRIFT_PERCENT = Decimal(2)
    ledger_matching("openai", OPENAI_COSTS, mispriced=MINI, by="0.9")  # we list 10% too cheap
    ledger_matching("anthropic", ANTHROPIC_COSTS)

    out = import_file("openai", OPENAI_COSTS)
    import_file("anthropic", ANTHROPIC_COSTS)

    rows = provider_reconciliation(since=FEBRUARY[0], until=FEBRUARY[1])
    assert len(rows) == 112  # 2 providers x 2 models x 28 days, nothing from Jan 31 / Mar 1
    flagged = {(r.provider, r.model, r.day) for r in rows if r.drifts(Decimal(2))}
    assert flagged == {("openai", MINI, d) for d in MISPRICED_DAYS}
    exact = [r for r in rows if (r.provider, r.model, r.day) not in flagged]
    assert all(r.drift_usd == 0 and r.drift_percent == 0 for r in exact)
    wrong = next(r for r in rows if (r.model, r.day) == (MINI, date(2026, 2, 10)))
    assert wrong.drift_percent == Decimal("10.00")
    assert (
        wrong.drift_usd
        == (wrong.provider_cost_usd or 0) - Decimal(wrong.ledger_cost_micro_usd) / 1_000_000
    )
    assert "3 new drift alert(s)" in out
    assert set(DriftAlert.objects.values_list("provider", "model", "day")) == flagged


def test_it_alerts_finance_once_per_model_and_day(settings: Any) -> None:
    User.objects.create_superuser("root", "root@example.com", "pw")
    fiona = User.objects.create_user("fiona", "fiona@example.com", "pw")
    StaffRole.objects.create(user=fiona, role=PlatformRole.FINANCE)
    User.objects.create_user("bob", "bob@example.com", "pw")  # nobody on the platform
    ledger_matching("openai", OPENAI_COSTS, mispriced=MINI, by="1.5")
    import_file("openai", OPENAI_COSTS)
    # A corrected export of a mispriced day: the alert of that day is not raised twice.
    document = json.loads(OPENAI_COSTS.read_text())
    document["data"] = document["data"][9:12]
    document["data"][0]["results"][0]["amount"]["value"] = Decimal("0.01")
    newer = FIXTURES.parent / "tmp_newer.json"
    newer.write_text(json.dumps(document, default=str))
    try:
        import_file("openai", newer)
    finally:
        newer.unlink()
    assert DriftAlert.objects.count() == 3

    for _ in range(2):  # a second sweep (or a redelivered task) sends nothing more
        for alert_id in notifications.drift_alerts_pending():
            notifications.drift_alert_deliver(alert_id=alert_id)
    for email_id in notifications.emails_due():
        notifications.email_send(email_id=email_id)

    emails = EmailNotification.objects.filter(key__startswith="drift_alert:")
    assert emails.count() == 3
    assert len(mail.outbox) == 3
    message = next(m for m in mail.outbox if "2026-02-10" in m.subject)
    assert sorted(message.to) == ["fiona@example.com", "root@example.com"]
    assert MINI in message.subject and "-50.00%" in message.body
    assert all(a.delivered_at for a in DriftAlert.objects.all())


# --- the API -------------------------------------------------------------------------------------

ADMIN = "reconciliation-test-admin-token"


def api(token: str | None, query: str = "") -> Any:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return Client().get(f"/api/admin/reconciliations/provider{query}", headers=headers)


def test_the_api_reports_drift_as_decimal_strings_in_pages(settings: Any) -> None:
    settings.GATEWAY_ADMIN_TOKEN = ADMIN
    ledger_matching("openai", OPENAI_COSTS, mispriced=MINI, by="0.9")
    import_file("openai", OPENAI_COSTS)

    response = api(ADMIN, "?provider=openai&since=2026-02-10&until=2026-02-12&limit=3&offset=1")

    assert response.status_code == 200
    body = response.json()
    assert (body["count"], body["limit"], body["offset"]) == (4, 3, 1)
    assert body["items"][0] == {
        "provider": "openai",
        "model": MINI,
        "day": "2026-02-10",
        "ledger_requests": 2,
        "ledger_cost_usd": "0.332730",
        "provider_cost_usd": "0.369700",
        "drift_usd": "0.036970",
        "drift_percent": "10.00",
        "flagged": True,
        "ledger_input_tokens": 0,
        "ledger_output_tokens": 0,
        "provider_input_tokens": None,
        "provider_output_tokens": None,
    }
    assert [(i["day"], i["flagged"]) for i in body["items"]] == [
        ("2026-02-10", True),
        ("2026-02-11", False),
        ("2026-02-11", True),
    ]
    # The rollup reconciliation runs keep their own place.
    assert (
        Client()
        .get("/api/admin/usage/reconciliations", HTTP_AUTHORIZATION=f"Bearer {ADMIN}")
        .status_code
        == 200
    )


def test_the_api_refuses_no_token_and_a_wrong_one(settings: Any) -> None:
    settings.GATEWAY_ADMIN_TOKEN = ADMIN
    assert api(None).status_code == 401
    assert api("sk-a-virtual-key-is-not-the-admin-token").status_code == 401
    assert api(ADMIN, "?since=2026-02-10&until=2026-02-01").status_code == 400


# --- the dashboard page --------------------------------------------------------------------------


def test_the_page_shows_finance_the_flagged_days_and_refuses_a_team_member() -> None:
    fiona = User.objects.create_user("fiona", "fiona@example.com", "pw")
    StaffRole.objects.create(user=fiona, role=PlatformRole.FINANCE)
    bob = User.objects.create_user("bob", "bob@example.com", "pw")
    team = account_services.team_create(name="Acme")
    Membership.objects.create(user=bob, team=team, role=TeamRole.ADMIN)
    ledger_matching("openai", OPENAI_COSTS, mispriced=MINI, by="0.9")
    import_file("openai", OPENAI_COSTS)

    finance = Client()
    finance.force_login(fiona)
    response = finance.get("/reconciliation/?month=2026-02&provider=openai")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('data-flagged="1"') == 3
    assert "3 flagged" in html and MINI in html and "10.00%" in html

    member = Client()
    member.force_login(bob)
    assert member.get("/reconciliation/?month=2026-02").status_code in (403, 404)
    assert "Reconciliation" not in member.get("/").content.decode()
