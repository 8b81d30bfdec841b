"""The load-testing commands: generate ledger rows, then time the pages over them."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command

from accounts.models import Team, VirtualKey
from billing.models import LedgerEntry

pytestmark = pytest.mark.django_db


def test_it_generates_ledger_rows_for_generated_teams_and_keys() -> None:
    out = io.StringIO()
    call_command(
        "dashboard_generate_ledger", rows=5000, days=30, teams=3, keys_per_team=2, stdout=out
    )
    assert "Wrote 5,000 ledger rows" in out.getvalue()
    assert LedgerEntry.objects.count() == 5000
    assert Team.objects.filter(name__startswith="Load team").count() == 3
    keys = set(VirtualKey.objects.values_list("id", flat=True))
    assert set(LedgerEntry.objects.values_list("key_id", flat=True).distinct()) <= keys
    # Idempotent set-up: a second run adds rows, not teams.
    call_command(
        "dashboard_generate_ledger", rows=10, days=30, teams=3, keys_per_team=2, stdout=out
    )
    assert Team.objects.filter(name__startswith="Load team").count() == 3
    assert LedgerEntry.objects.count() == 5010


def test_it_times_the_overview_and_usage_pages() -> None:
    call_command("dashboard_generate_ledger", rows=2000, days=30, teams=2, keys_per_team=2)
    out = io.StringIO()
    call_command("dashboard_time_pages", runs=3, stdout=out)
    lines = out.getvalue().splitlines()
    timed = [line for line in lines if re.search(r"GET /(overview|usage)/ .*p50 .* ms .*max", line)]
    assert len(timed) == 2, out.getvalue()
