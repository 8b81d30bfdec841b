"""Usage rollups: hourly and daily sums of the ledger, built incrementally and exactly.

The invariant: every UsageRollup bucket holds exactly the ledger rows whose
`started_at` falls in the bucket and whose `created_at` is before
`RollupState.cutoff`. Readers add the "live tail" (rows created since the cutoff)
to get exact, current numbers (billing.usage).

A run picks a new cutoff (now) and recomputes, from the ledger, every hour touched
by a row created since the previous cutoff (less GATEWAY_ROLLUP_OVERLAP_SECONDS, so a
row whose transaction committed a little late is still seen), then the days of
those hours from their hours. A bucket is recomputed by delete + insert inside the
run's transaction, so a run is idempotent, and one that dies half-way (kill -9)
rolls back whole: the next run simply does the work again. Late rows (a stream
that ended minutes after it started, a batch line) land in an already-rolled hour
and are picked up because that hour is touched again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from billing.models import (
    Granularity,
    LedgerEntry,
    LedgerStatus,
    ReconciliationRun,
    RollupState,
    UsageRollup,
)

logger = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
METRICS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "list_cost_micro_usd",
    "charged_cost_micro_usd",
)
TOKEN_FIELDS = METRICS[2:7]
COST_FIELDS = METRICS[7:]
DIMENSIONS = ("team_id", "key_id", "model", "deployment_id")
# An attempt that failed (no answer, or an answer cut off by the provider).
ERROR_STATUSES = (LedgerStatus.ERROR, LedgerStatus.PARTIAL)


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_day(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _locked_state() -> RollupState:
    RollupState.objects.get_or_create(singleton=True)
    return RollupState.objects.select_for_update().get(singleton=True)


def rollup_cutoff() -> datetime | None:
    """Buckets hold the ledger rows created before this instant (None: nothing rolled yet)."""
    return RollupState.objects.filter(singleton=True).values_list("cutoff", flat=True).first()


# --- computing buckets ----------------------------------------------------------------------


def _ledger_sums(rows: Any) -> Any:
    return rows.annotate(
        requests=Count("id"),
        errors=Count("id", filter=Q(status__in=ERROR_STATUSES)),
        **{name: Sum(name) for name in (*TOKEN_FIELDS, *COST_FIELDS)},
    )


def _roll_hour(hour: datetime, cutoff: datetime) -> int:
    rows = LedgerEntry.objects.filter(
        started_at__gte=hour, started_at__lt=hour + HOUR, created_at__lt=cutoff
    )
    UsageRollup.objects.filter(granularity=Granularity.HOUR, bucket_start=hour).delete()
    out: list[UsageRollup] = []
    for group in _ledger_sums(rows.order_by().values(*DIMENSIONS)):
        out.append(
            UsageRollup(
                granularity=Granularity.HOUR,
                bucket_start=hour,
                team_id=group["team_id"],
                key_id=group["key_id"] or 0,
                model=group["model"],
                deployment_id=group["deployment_id"],
                tag="",
                **{name: int(group[name] or 0) for name in METRICS},
            )
        )
    # A row tagged [a, b] counts once under each of its tags (never in the tag="" total twice).
    tagged: dict[tuple[Any, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
    fields = (*DIMENSIONS, "status", "tags", *TOKEN_FIELDS, *COST_FIELDS)
    for values in rows.exclude(tags=[]).order_by().values_list(*fields).iterator(chunk_size=2000):
        row = dict(zip(fields, values, strict=True))
        for tag in dict.fromkeys(row["tags"] or ()):
            if not isinstance(tag, str) or not tag:
                continue
            sums = tagged[
                (row["team_id"], row["key_id"] or 0, row["model"], row["deployment_id"], tag[:64])
            ]
            _add_row(sums, row)
    for (team_id, key_id, model, deployment_id, tag), sums in tagged.items():
        out.append(
            UsageRollup(
                granularity=Granularity.HOUR,
                bucket_start=hour,
                team_id=team_id,
                key_id=key_id,
                model=model,
                deployment_id=deployment_id,
                tag=tag,
                **sums,
            )
        )
    UsageRollup.objects.bulk_create(out, batch_size=1000)
    return len(out)


def _add_row(sums: dict[str, int], row: dict[str, Any]) -> None:
    sums["requests"] += 1
    sums["errors"] += 1 if row["status"] in ERROR_STATUSES else 0
    for name in (*TOKEN_FIELDS, *COST_FIELDS):
        sums[name] += int(row[name] or 0)


def _roll_day(day: datetime) -> int:
    hours = UsageRollup.objects.filter(
        granularity=Granularity.HOUR, bucket_start__gte=day, bucket_start__lt=day + DAY
    )
    UsageRollup.objects.filter(granularity=Granularity.DAY, bucket_start=day).delete()
    out = [
        UsageRollup(
            granularity=Granularity.DAY,
            bucket_start=day,
            **{name: group[name] for name in (*DIMENSIONS, "tag")},
            **{name: int(group[f"sum_{name}"] or 0) for name in METRICS},
        )
        for group in hours.order_by()
        .values(*DIMENSIONS, "tag")
        .annotate(**{f"sum_{name}": Sum(name) for name in METRICS})
    ]
    UsageRollup.objects.bulk_create(out, batch_size=1000)
    return len(out)


def _touched_hours(rows: Any) -> set[datetime]:
    found = (
        rows.annotate(hour=TruncHour("started_at", tzinfo=UTC))
        .order_by()
        .values_list("hour", flat=True)
        .distinct()
    )
    return {floor_hour(hour) for hour in found}


def _reroll(hours: Iterable[datetime], cutoff: datetime) -> int:
    hours = sorted(set(hours))
    written = sum(_roll_hour(hour, cutoff) for hour in hours)
    for day in sorted({floor_day(hour) for hour in hours}):
        written += _roll_day(day)
    return written


# --- the services the tasks call -----------------------------------------------------------------


@dataclass(frozen=True)
class RollupRun:
    cutoff: datetime
    hours: int
    rows_written: int


def rollups_update(*, now: datetime | None = None) -> RollupRun:
    """Bring the rollups up to `now` (default: the current time). Idempotent."""
    now = now or timezone.now()
    with transaction.atomic():
        state = _locked_state()
        cutoff = max(now, state.cutoff) if state.cutoff else now
        rows = LedgerEntry.objects.filter(created_at__lt=cutoff)
        if state.cutoff is not None:
            overlap = timedelta(seconds=settings.GATEWAY_ROLLUP_OVERLAP_SECONDS)
            rows = rows.filter(created_at__gte=state.cutoff - overlap)
        hours = _touched_hours(rows)
        written = _reroll(hours, cutoff)
        state.cutoff = cutoff
        state.last_run_at = timezone.now()
        state.last_run_buckets = len(hours)
        state.save(update_fields=["cutoff", "last_run_at", "last_run_buckets"])
    return RollupRun(cutoff=cutoff, hours=len(hours), rows_written=written)


def rollups_rebuild(*, since: datetime, until: datetime) -> RollupRun:
    """Recompute every hour (and its day) in [since, until) from the ledger.

    Uses the current cutoff, so readers' "rollups + live tail" stays exact. Before the
    first update there is no cutoff yet: that update then does everything.
    """
    with transaction.atomic():
        state = _locked_state()
        cutoff = state.cutoff
        if cutoff is not None:
            hours = []
            hour = floor_hour(since)
            while hour < until:
                hours.append(hour)
                hour += HOUR
            written = _reroll(hours, cutoff)
            return RollupRun(cutoff=cutoff, hours=len(hours), rows_written=written)
    return rollups_update()


def rollups_reconcile(
    *, since: datetime, until: datetime, repair: bool = False
) -> ReconciliationRun:
    """Compare the hourly and daily team totals with the ledger; store and log the result.

    With `repair`, the mismatched buckets are recomputed afterwards (and the run says so).
    """
    since, until = floor_hour(since), floor_hour(until - timedelta(microseconds=1)) + HOUR
    with transaction.atomic():
        # Locked so that no rollup run moves the cutoff while both sides are read.
        state = _locked_state()
        cutoff = state.cutoff
        differences: list[dict[str, Any]] = []
        checked = 0
        if cutoff is not None:
            ledger_rows = LedgerEntry.objects.filter(
                started_at__gte=since, started_at__lt=until, created_at__lt=cutoff
            )
            ledger = {
                (floor_hour(g["hour"]), g["team_id"]): g
                for g in _ledger_sums(
                    ledger_rows.annotate(hour=TruncHour("started_at", tzinfo=UTC))
                    .order_by()
                    .values("hour", "team_id")
                )
            }
            hourly = _rollup_totals(Granularity.HOUR, since, until)
            checked += len(set(ledger) | set(hourly))
            differences += _compare("hour", ledger, hourly)
            # Days entirely inside the window: their day rows against the ledger's.
            day_since = floor_day(since) if floor_day(since) == since else floor_day(since) + DAY
            day_until = floor_day(until)
            if day_since < day_until:
                ledger_days: dict[tuple[datetime, int], dict[str, int]] = defaultdict(
                    lambda: dict.fromkeys(METRICS, 0)
                )
                for (hour, team_id), sums in ledger.items():
                    if day_since <= hour < day_until:
                        for name in METRICS:
                            ledger_days[(floor_day(hour), team_id)][name] += int(sums[name] or 0)
                daily = _rollup_totals(Granularity.DAY, day_since, day_until)
                checked += len(set(ledger_days) | set(daily))
                differences += _compare("day", ledger_days, daily)
        run = ReconciliationRun.objects.create(
            window_start=since,
            window_end=until,
            cutoff=cutoff,
            buckets_checked=checked,
            ok=not differences,
            differences=differences[:100],
        )
        if differences:
            logger.error(
                "rollup reconciliation found %d differences in [%s, %s): %s",
                len(differences),
                since.isoformat(),
                until.isoformat(),
                differences[:5],
            )
            if repair and cutoff is not None:
                hours = set()
                for diff in differences:
                    start = datetime.fromisoformat(diff["bucket_start"])
                    span = DAY if diff["granularity"] == "day" else HOUR
                    hour = start
                    while hour < start + span:
                        hours.add(hour)
                        hour += HOUR
                _reroll(hours, cutoff)
                run.repaired = True
                run.save(update_fields=["repaired"])
    return run


def _rollup_totals(
    granularity: str, since: datetime, until: datetime
) -> dict[tuple[datetime, int], dict[str, Any]]:
    rows = (
        UsageRollup.objects.filter(
            granularity=granularity, bucket_start__gte=since, bucket_start__lt=until, tag=""
        )
        .order_by()
        .values("bucket_start", "team_id")
        .annotate(**{name: Sum(name) for name in METRICS})
    )
    return {(floor_hour(g["bucket_start"]), g["team_id"]): dict(g) for g in rows}


def _compare(
    granularity: str,
    ledger: dict[tuple[datetime, int], Any],
    rollups: dict[tuple[datetime, int], Any],
) -> list[dict[str, Any]]:
    out = []
    for bucket, team_id in sorted(set(ledger) | set(rollups)):
        want = ledger.get((bucket, team_id)) or {}
        have = rollups.get((bucket, team_id)) or {}
        for name in METRICS:
            expected, found = int(want.get(name) or 0), int(have.get(name) or 0)
            if expected != found:
                out.append(
                    {
                        "granularity": granularity,
                        "bucket_start": bucket.isoformat(),
                        "team_id": team_id,
                        "field": name,
                        "ledger": expected,
                        "rollup": found,
                    }
                )
    return out
