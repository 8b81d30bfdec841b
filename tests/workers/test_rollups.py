"""Usage rollups, built by a real worker: exact, idempotent, late rows picked up, reconciled."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Count, Q, Sum

from billing.models import LedgerEntry, ReconciliationRun, RollupState, UsageRollup
from billing.usage import usage_report
from tests.support.money import ledger_row, write
from tests.support.waiting import wait_for
from tests.support.workers import send_task

pytestmark = pytest.mark.e2e

SUMS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "list_cost_micro_usd",
    "charged_cost_micro_usd",
)


def run_rollups() -> RollupState:
    before = (
        RollupState.objects.filter(singleton=True).values_list("last_run_at", flat=True).first()
    )
    send_task("billing.rollups_update")
    return wait_for(
        lambda: RollupState.objects.filter(singleton=True).exclude(last_run_at=before).first(),
        30,
        what="the rollup task",
    )


def ledger_totals(**filters) -> dict[str, int]:
    rows = LedgerEntry.objects.filter(**filters)
    found = rows.aggregate(
        requests=Count("id"),
        errors=Count("id", filter=Q(status__in=["error", "partial"])),
        **{name: Sum(name) for name in SUMS},
    )
    return {k: int(v or 0) for k, v in found.items()}


def rollup_totals(granularity: str, **filters) -> dict[str, int]:
    rows = UsageRollup.objects.filter(granularity=granularity, **filters)
    found = rows.aggregate(
        requests=Sum("requests"), errors=Sum("errors"), **{name: Sum(name) for name in SUMS}
    )
    return {k: int(v or 0) for k, v in found.items()}


def snapshot() -> list[tuple]:
    return sorted(
        UsageRollup.objects.values_list(
            "granularity",
            "bucket_start",
            "team_id",
            "key_id",
            "model",
            "deployment_id",
            "tag",
            "requests",
            "errors",
            *SUMS,
        )
    )


def test_it_rolls_up_the_ledger_exactly_and_idempotently(worker):
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
    rng = random.Random(7)
    rows = []
    for _ in range(300):
        rows.append(
            ledger_row(
                team_id=rng.choice([101, 102]),
                key_id=rng.choice([1, 2, None]),
                model=rng.choice(["m-a", "m-b"]),
                deployment_id=rng.choice(["d1", "d2"]),
                status=rng.choice(
                    ["success", "success", "error", "partial", "client_disconnected"]
                ),
                tags=rng.choice([[], ["a"], ["a", "b"], ["b"]]),
                started_at=base + timedelta(minutes=rng.randint(0, 60 * 40)),
            )
        )
    write(rows)

    state = run_rollups()
    assert state.cutoff is not None
    for team_id in (101, 102):
        want = ledger_totals(team_id=team_id)
        # tag="" rows count each ledger row once: team totals are exact.
        assert rollup_totals("hour", team_id=team_id, tag="") == want
        assert rollup_totals("day", team_id=team_id, tag="") == want
        # A row tagged [a, b] counts in both tags.
        for tag in ("a", "b"):
            assert rollup_totals("hour", team_id=team_id, tag=tag) == ledger_totals(
                team_id=team_id, tags__contains=[tag]
            )
    by_key = rollup_totals("hour", team_id=101, key_id=0, tag="")
    assert by_key == ledger_totals(team_id=101, key_id__isnull=True)

    first = snapshot()
    run_rollups()
    assert snapshot() == first  # re-running changes nothing

    # A full rebuild of the window gives the same rows too.
    send_task("billing.rollups_rebuild", base.isoformat(), (base + timedelta(days=3)).isoformat())
    wait_for(lambda: snapshot() == first, 30, what="the rebuild")


def test_it_picks_up_late_rows_and_serves_the_live_tail(worker):
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    write(
        [ledger_row(team_id=201, started_at=hour + timedelta(minutes=m)) for m in range(0, 60, 6)]
    )
    run_rollups()
    rolled = rollup_totals("hour", team_id=201, tag="", bucket_start=hour)
    assert rolled["requests"] == 10

    # A row for that (already rolled) hour arrives late, e.g. a long stream or a batch line.
    late = write([ledger_row(team_id=201, started_at=hour + timedelta(minutes=30), tags=["x"])])[0]
    since, until = hour - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    # Before the next run the selectors add it from the ledger's live tail: exact anyway.
    report = usage_report(since=since, until=until, team_id=201)
    assert report[0]["requests"] == 11
    assert (
        report[0]["charged_cost_micro_usd"] == ledger_totals(team_id=201)["charged_cost_micro_usd"]
    )

    run_rollups()
    assert rollup_totals("hour", team_id=201, tag="", bucket_start=hour)["requests"] == 11
    assert rollup_totals("hour", team_id=201, tag="x")["charged_cost_micro_usd"] == (
        late.charged_cost_micro_usd
    )
    assert usage_report(since=since, until=until, team_id=201) == report
    # Partial hours at the edges come from the ledger itself.
    edge = usage_report(
        since=hour + timedelta(minutes=15), until=hour + timedelta(minutes=45), team_id=201
    )
    assert (
        edge[0]["requests"]
        == ledger_totals(
            team_id=201,
            started_at__gte=hour + timedelta(minutes=15),
            started_at__lt=hour + timedelta(minutes=45),
        )["requests"]
    )
    by_hour = usage_report(since=since, until=until, team_id=201, bucket="hour", group_by=["tag"])
    assert [(r["bucket_start"], r["tag"], r["requests"]) for r in by_hour] == [(hour, "x", 1)]


def test_it_reconciles_rollups_with_the_ledger_and_reports_differences(worker):
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    write([ledger_row(team_id=301, started_at=hour + timedelta(minutes=m)) for m in range(10)])
    run_rollups()

    send_task("billing.rollups_reconcile", hours=6)
    run = wait_for(lambda: ReconciliationRun.objects.first(), 30, what="reconciliation")
    assert run.ok and run.differences == [] and run.buckets_checked >= 1

    # Someone (or a bug) changes a bucket: the next reconciliation says where and by how much.
    bucket = UsageRollup.objects.filter(granularity="hour", team_id=301, tag="").first()
    assert bucket is not None
    UsageRollup.objects.filter(id=bucket.id).update(
        charged_cost_micro_usd=bucket.charged_cost_micro_usd + 5
    )
    send_task("billing.rollups_reconcile", hours=6, repair=True)
    bad = wait_for(
        lambda: ReconciliationRun.objects.filter(ok=False).first(), 30, what="reconciliation"
    )
    assert {
        (d["granularity"], d["team_id"], d["field"], d["rollup"] - d["ledger"])
        for d in bad.differences
    } == {("hour", 301, "charged_cost_micro_usd", 5)}
    assert bad.repaired
    send_task("billing.rollups_reconcile", hours=6)
    wait_for(lambda: ReconciliationRun.objects.filter(ok=True).count() == 2, 30, what="repair")
