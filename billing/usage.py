"""Selectors for usage: the rollups plus the live tail of the ledger, exact to the row.

For the dashboard and the spend APIs. A window [since, until) on `started_at` is
answered from three parts that never overlap:

* whole UTC days inside the window: daily rollups;
* whole hours left over: hourly rollups;
* partial hours at the edges: the ledger itself;
* plus, for the rolled-up parts, the ledger rows created since the rollups' cutoff.

So the numbers equal a direct sum over the ledger, whenever the rollups last ran.
`tag=""` rollups count each ledger row once; grouping by "tag" uses the per-tag rows
(a row tagged [a, b] counts under a and under b, so per-tag numbers do not add up
to the total; rows without tags are not in any tag group).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from django.db.models import Q, Sum

from billing.models import Granularity, LedgerEntry, UsageRollup
from billing.rollups import (
    COST_FIELDS,
    DAY,
    ERROR_STATUSES,
    HOUR,
    METRICS,
    TOKEN_FIELDS,
    floor_day,
    floor_hour,
    rollup_cutoff,
)

GroupBy = Literal["team_id", "key_id", "model", "deployment_id", "tag"]
Bucket = Literal["hour", "day"]
GROUPABLE = ("team_id", "key_id", "model", "deployment_id", "tag")


def _segments(since: datetime, until: datetime) -> list[tuple[str, datetime, datetime]]:
    """[since, until) cut into ("day" | "hour" | "raw", start, end) pieces."""
    out: list[tuple[str, datetime, datetime]] = []
    cursor = since
    while cursor < until:
        if cursor == floor_day(cursor) and cursor + DAY <= until:
            out.append(("day", cursor, cursor + DAY))
            cursor += DAY
        elif cursor == floor_hour(cursor) and cursor + HOUR <= until:
            out.append(("hour", cursor, cursor + HOUR))
            cursor += HOUR
        else:
            end = min(until, floor_hour(cursor) + HOUR)
            out.append(("raw", cursor, end))
            cursor = end
    return out


def _merge(segments: list[tuple[str, datetime, datetime]]) -> list[tuple[str, datetime, datetime]]:
    merged: list[tuple[str, datetime, datetime]] = []
    for kind, start, end in segments:
        if merged and merged[-1][0] == kind and merged[-1][2] == start:
            merged[-1] = (kind, merged[-1][1], end)
        else:
            merged.append((kind, start, end))
    return merged


def _bucket_of(moment: datetime, bucket: Bucket | None) -> datetime | None:
    if bucket is None:
        return None
    return floor_day(moment) if bucket == "day" else floor_hour(moment)


def usage_report(
    *,
    since: datetime,
    until: datetime,
    team_id: int | None = None,
    key_id: int | None = None,
    model: str | None = None,
    tag: str | None = None,
    group_by: Sequence[GroupBy] = (),
    bucket: Bucket | None = None,
) -> list[dict[str, Any]]:
    """Usage in [since, until) (on `started_at`), filtered, grouped and optionally bucketed.

    Returns one dict per group (and bucket): the group's keys (`bucket_start` when
    bucketed, then each of `group_by`), then `requests`, `errors`, `prompt_tokens`,
    `completion_tokens`, `cached_read_tokens`, `cache_write_tokens`,
    `reasoning_tokens`, `list_cost_micro_usd` and `charged_cost_micro_usd`. Sorted by
    bucket, then by charged cost (highest first). `key_id` 0 means "no key".
    A daily bucket is a UTC day; hours are UTC hours.
    """
    for dimension in group_by:
        if dimension not in GROUPABLE:
            raise ValueError(f"cannot group usage by {dimension!r}; use one of {GROUPABLE}")
    by_tag = "tag" in group_by
    cutoff = rollup_cutoff()
    sums: dict[tuple[Any, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))

    def key_of(values: dict[str, Any], moment: datetime) -> tuple[Any, ...]:
        return (_bucket_of(moment, bucket), *(values[name] for name in group_by))

    raw: list[tuple[datetime, datetime]] = []
    rolled: list[tuple[str, datetime, datetime]] = []
    for kind, start, end in _merge(_segments(since, until)):
        if kind == "raw" or cutoff is None:
            raw.append((start, end))
        else:
            rolled.append((kind, start, end))

    # The rolled-up parts.
    for kind, start, end in rolled:
        granularity = Granularity.DAY if kind == "day" else Granularity.HOUR
        if bucket == "hour" and kind == "day":
            # Day rows cannot be split into hours: read the hours instead.
            granularity, kind = Granularity.HOUR, "hour"
        rows = UsageRollup.objects.filter(
            granularity=granularity, bucket_start__gte=start, bucket_start__lt=end
        )
        if tag is not None:
            rows = rows.filter(tag=tag)
        elif by_tag:
            rows = rows.exclude(tag="")
        else:
            rows = rows.filter(tag="")
        if team_id is not None:
            rows = rows.filter(team_id=team_id)
        if key_id is not None:
            rows = rows.filter(key_id=key_id)
        if model is not None:
            rows = rows.filter(model=model)
        dims = [name for name in group_by]
        for group in (
            rows.order_by()
            .values("bucket_start", *dims)
            .annotate(**{f"sum_{name}": Sum(name) for name in METRICS})
        ):
            target = sums[key_of(group, group["bucket_start"])]
            for name in METRICS:
                target[name] += int(group[f"sum_{name}"] or 0)

    # The ledger: partial hours whole, and the rolled-up parts' live tail.
    ledger_parts = Q()
    for start, end in raw:
        ledger_parts |= Q(started_at__gte=start, started_at__lt=end)
    if cutoff is not None:
        for _kind, start, end in rolled:
            ledger_parts |= Q(started_at__gte=start, started_at__lt=end, created_at__gte=cutoff)
    if ledger_parts:
        rows_q = LedgerEntry.objects.filter(ledger_parts)
        if team_id is not None:
            rows_q = rows_q.filter(team_id=team_id)
        if key_id is not None:
            rows_q = rows_q.filter(key_id=key_id)
        if model is not None:
            rows_q = rows_q.filter(model=model)
        for row in _ledger_values(rows_q):
            row["key_id"] = row["key_id"] or 0
            tags = [t[:64] for t in dict.fromkeys(row["tags"] or ()) if isinstance(t, str) and t]
            if tag is not None:
                if tag not in tags:
                    continue
                labels: Iterable[str] = [tag]
            elif by_tag:
                labels = tags
            else:
                labels = [""]
            for label in labels:
                target = sums[key_of({**row, "tag": label}, row["started_at"])]
                target["requests"] += 1
                target["errors"] += 1 if row["status"] in ERROR_STATUSES else 0
                for name in (*TOKEN_FIELDS, *COST_FIELDS):
                    target[name] += int(row[name] or 0)

    out = []
    for group_key, metrics in sums.items():
        item: dict[str, Any] = {}
        if bucket is not None:
            item["bucket_start"] = group_key[0]
        for name, value in zip(group_by, group_key[1:], strict=True):
            item[name] = value
        item.update(metrics)
        out.append(item)
    out.sort(
        key=lambda item: (
            item.get("bucket_start") or since,
            -item["charged_cost_micro_usd"],
            *(str(item[n]) for n in group_by),
        )
    )
    return out


def _ledger_values(rows: Any) -> Iterable[dict[str, Any]]:
    fields = (
        "team_id",
        "key_id",
        "model",
        "deployment_id",
        "status",
        "tags",
        "started_at",
        *TOKEN_FIELDS,
        *COST_FIELDS,
    )
    for values in rows.order_by().values_list(*fields).iterator(chunk_size=2000):
        yield dict(zip(fields, values, strict=True))


def usage_totals(
    *,
    since: datetime,
    until: datetime,
    team_id: int | None = None,
    key_id: int | None = None,
) -> dict[str, int]:
    """One team's (or key's, or everyone's) exact totals in [since, until)."""
    rows = usage_report(since=since, until=until, team_id=team_id, key_id=key_id)
    return rows[0] if rows else dict.fromkeys(METRICS, 0)
