"""The usage explorer's reads, and the usage scopes the overview shares.

Spend, tokens, requests and errors come from billing.usage: the rollups plus the live
tail of the ledger, exact to the row whatever the window. Latency cannot (the rollups
keep no histograms), so it is read from the ledger itself, bounded twice: the last
LATENCY_HOURS of the window, and the latest LATENCY_ROWS requests of those. The pages
say which requests the percentiles describe. The pages consume the dataclasses
returned here, never querysets of ledger rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.functions import Trunc
from django.utils import timezone

from accounts.models import Team, VirtualKey
from billing import usage
from billing.models import LedgerEntry, LedgerKind
from billing.selectors import LedgerFilter, ledger_rows
from dashboard.access import Viewer
from dashboard.charts import Axis, Window, axis_for

LATENCY_HOURS = 24
LATENCY_ROWS = 20_000


@dataclass(frozen=True)
class LedgerScope:
    """Which ledger rows a list covers (the request log, latency samples)."""

    viewer_q: Q | None
    window: Window | None = None
    team_id: int | None = None
    key_id: int | None = None
    model: str = ""
    tag: str = ""
    status: str = ""


def ledger(scope: LedgerScope) -> QuerySet[LedgerEntry]:
    """billing.selectors.ledger_rows for the scope, narrowed to what the viewer sees."""
    window = scope.window
    rows = ledger_rows(
        LedgerFilter(
            team_id=scope.team_id,
            key_id=scope.key_id,
            model=scope.model or None,
            status=scope.status or None,
            since=window.since if window is not None else None,
            until=window.until if window is not None else None,
            tag=scope.tag or None,
        )
    )
    return rows if scope.viewer_q is None else rows.filter(scope.viewer_q)


@dataclass(frozen=True)
class UsageScope:
    """Which usage a figure covers: the viewer's, narrowed by the filters."""

    viewer: Viewer
    window: Window
    team_id: int | None = None
    key_id: int | None = None
    model: str = ""
    tag: str = ""


@dataclass(frozen=True)
class Visible:
    """The usage a viewer who does not see every team sees: whole teams, and own keys."""

    teams: frozenset[int]
    keys: frozenset[int]

    def allows(self, team_id: int, key_id: int) -> bool:
        return team_id in self.teams or key_id in self.keys

    def ledger_q(self) -> Q | None:
        """The same as a filter on LedgerEntry (None: nothing at all)."""
        parts = []
        if self.teams:
            parts.append(Q(team_id__in=sorted(self.teams)))
        if self.keys:
            parts.append(Q(key_id__in=sorted(self.keys)))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0] | parts[1]


def visible_usage(viewer: Viewer) -> Visible | None:
    """None for those who see every team; else one query at most (a member's own keys)."""
    if viewer.sees_all_teams:
        return None
    keys: frozenset[int] = frozenset()
    if viewer.member_team_ids:
        keys = frozenset(
            VirtualKey.objects.filter(
                team_id__in=viewer.member_team_ids, owner_id=viewer.user_id
            ).values_list("id", flat=True)
        )
    return Visible(frozenset(viewer.admin_team_ids), keys)


@dataclass(frozen=True)
class Plan:
    """How to ask billing.usage for a scope: the filters it applies, and what is left to us.

    billing.usage filters by one team or one key. A viewer whose scope is several teams,
    or their own keys in a team, gets one call grouped by team and key as well, and the
    groups outside their scope are dropped here: one call whatever the number of teams.
    """

    team_id: int | None
    key_id: int | None
    keep: Visible | None  # None: every row billing.usage returns is the viewer's
    nothing: bool = False

    @property
    def narrow(self) -> bool:
        """One team or one key: few enough hourly rows to regroup into local days."""
        return self.team_id is not None or self.key_id is not None


def plan_for(scope: UsageScope, visible: Visible | None) -> Plan:
    team_id, key_id = scope.team_id, scope.key_id
    if visible is None or (team_id is not None and team_id in visible.teams):
        return Plan(team_id, key_id, None)
    if key_id is not None and key_id in visible.keys:
        return Plan(team_id, key_id, None)
    if team_id is None and key_id is None:
        if not visible.teams and not visible.keys:
            return Plan(None, None, visible, nothing=True)
        if len(visible.teams) == 1 and not visible.keys:
            return Plan(next(iter(visible.teams)), None, None)
        if not visible.teams and len(visible.keys) == 1:
            return Plan(None, next(iter(visible.keys)), None)
    return Plan(team_id, key_id, visible)


def report(
    scope: UsageScope, plan: Plan, *, dims: Sequence[str], bucket: str | None
) -> list[dict[str, Any]]:
    """billing.usage.usage_report for the scope, narrowed to what the viewer sees."""
    if plan.nothing:
        return []
    extra: tuple[str, ...] = ()
    if plan.keep is not None:
        # Grouped by what decides visibility: the team, and the key only for own keys
        # (a key per group multiplies the groups, and Python reads every one).
        extra = ("team_id", "key_id") if plan.keep.keys else ("team_id",)
    group_by: Any = tuple(dict.fromkeys((*extra, *dims)))
    rows = usage.usage_report(
        since=scope.window.since,
        until=scope.window.until,
        team_id=plan.team_id,
        key_id=plan.key_id,
        model=scope.model or None,
        tag=scope.tag or None,
        group_by=group_by,
        bucket=bucket,  # type: ignore[arg-type]
    )
    if plan.keep is not None:
        keep = plan.keep
        rows = [row for row in rows if keep.allows(row["team_id"], row.get("key_id", -1))]
    return rows


@dataclass
class Totals:
    requests: int = 0
    errors: int = 0
    spend_micro_usd: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, row: dict[str, Any]) -> None:
        """Add one billing.usage row."""
        self.requests += row["requests"]
        self.errors += row["errors"]
        self.spend_micro_usd += row["charged_cost_micro_usd"]
        self.prompt_tokens += row["prompt_tokens"]
        self.completion_tokens += row["completion_tokens"]


@dataclass(frozen=True)
class Latency:
    """Latency percentiles of a bounded sample of the ledger, and what the sample is."""

    p50_ms: int | None
    p95_ms: int | None
    requests: int
    since: datetime  # the sample is the latest requests in [since, until)
    until: datetime
    capped: bool  # more requests than LATENCY_ROWS in the range: the latest of them only
    oldest: datetime | None = None  # the earliest request in the sample
    # (UTC hour, p50, p95) for each hour with requests in the sample.
    by_hour: tuple[tuple[datetime, int, int], ...] = ()

    @property
    def hours(self) -> int:
        return round((self.until - self.since).total_seconds() / 3600)


_LATENCY_SQL = """
SELECT GROUPING(hour), hour,
       percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms),
       percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms),
       COUNT(*), MIN(started_at)
FROM ({inner}) AS sample
GROUP BY GROUPING SETS ((hour), ())
"""


def _nearest_rank(ordered: list[int], fraction: float) -> int | None:
    """The nearest-rank percentile of sorted values (what Postgres' percentile_disc gives)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_sample(
    scope: UsageScope, visible: Visible | None, now: datetime | None = None
) -> Latency:
    """p50 and p95 of the latest requests (at most LATENCY_ROWS) in the window's last
    LATENCY_HOURS: one query that walks an index backwards from the newest row, so it
    costs the same on a ledger of a thousand rows or a billion."""
    now = now or timezone.now()
    until = min(scope.window.until, now)
    since = max(scope.window.since, until - timedelta(hours=LATENCY_HOURS))
    empty = Latency(None, None, 0, since, until, False)
    viewer_q = visible.ledger_q() if visible is not None else None
    if since >= until or (visible is not None and viewer_q is None):
        return empty
    rows = ledger(
        LedgerScope(
            viewer_q=viewer_q,
            window=Window(since, until, scope.window.tz, ""),
            team_id=scope.team_id,
            key_id=scope.key_id,
            model=scope.model,
            tag=scope.tag,
        )
    ).filter(kind=LedgerKind.CHARGE)
    latest = (
        rows.annotate(hour=Trunc("started_at", "hour", tzinfo=UTC))
        .order_by("-started_at")
        .values("hour", "latency_ms", "started_at")[:LATENCY_ROWS]
    )
    overall: tuple[int | None, int | None, int, datetime | None] = (None, None, 0, None)
    hours: list[tuple[datetime, int, int]] = []
    if connection.vendor == "postgresql":
        inner_sql, params = latest.query.sql_with_params()
        # The ORM's own SQL, its parameters passed separately: nothing typed by a user
        # is formatted into the string.
        with connection.cursor() as cursor:
            cursor.execute(_LATENCY_SQL.replace("{inner}", inner_sql), params)
            for grouping, hour, p50, p95, count, oldest in cursor:
                if grouping:
                    overall = (p50, p95, int(count), oldest)
                else:
                    # Truncated "AT TIME ZONE 'UTC'": a naive UTC timestamp.
                    hours.append((hour.replace(tzinfo=UTC), p50, p95))
    else:
        sample = [(r["hour"], r["latency_ms"], r["started_at"]) for r in latest]
        per_hour: dict[datetime, list[int]] = defaultdict(list)
        for hour, latency, _ in sample:
            per_hour[hour].append(latency)
        everything = sorted(latency for _, latency, _ in sample)
        overall = (
            _nearest_rank(everything, 0.5),
            _nearest_rank(everything, 0.95),
            len(sample),
            min((s for _, _, s in sample), default=None),
        )
        for hour, values in per_hour.items():
            values.sort()
            p50_hour, p95_hour = _nearest_rank(values, 0.5), _nearest_rank(values, 0.95)
            assert p50_hour is not None and p95_hour is not None
            hours.append((hour, p50_hour, p95_hour))
    hours.sort()
    p50, p95, count, oldest = overall
    return Latency(p50, p95, count, since, until, count >= LATENCY_ROWS, oldest, tuple(hours))


@dataclass(frozen=True)
class SeriesRow:
    bucket: datetime
    label: str
    group: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    spend_micro_usd: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


GROUP_FIELDS = {"model": "model", "team": "team_id", "key": "key_id", "tag": "tag"}


@dataclass
class Series:
    axis: Axis
    rows: list[SeriesRow]


def usage_series(scope: UsageScope, *, kind: str, group_by: str = "") -> Series:
    """Requests, errors, tokens and spend per time bucket (and group), from billing.usage."""
    plan = plan_for(scope, visible_usage(scope.viewer))
    axis = axis_for(scope.window, kind, narrow=plan.narrow)
    dim = GROUP_FIELDS.get(group_by)
    sums: dict[tuple[int, Any], list[int]] = defaultdict(lambda: [0] * 5)
    for row in report(scope, plan, dims=(dim,) if dim else (), bucket=axis.source):
        i = axis.index(row["bucket_start"])
        if i is None:  # cannot happen: the axis covers the window
            continue
        value = row[dim] if dim else ""
        if dim == "key_id" and value == 0:
            value = None  # billing.usage's "no key"
        agg = sums[(i, value)]
        agg[0] += row["requests"]
        agg[1] += row["errors"]
        agg[2] += row["prompt_tokens"]
        agg[3] += row["completion_tokens"]
        agg[4] += row["charged_cost_micro_usd"]
    labels = group_labels(group_by, [value for _, value in sums]) if dim else {}
    out = [
        SeriesRow(
            bucket=axis.starts[i],
            label=axis.label(axis.starts[i]),
            group=labels.get(value, str(value)) if dim else "",
            requests=agg[0],
            errors=agg[1],
            prompt_tokens=agg[2],
            completion_tokens=agg[3],
            spend_micro_usd=agg[4],
        )
        for (i, value), agg in sums.items()
    ]
    out.sort(key=lambda r: (r.bucket, -r.spend_micro_usd, r.group))
    return Series(axis, out)


def group_labels(group_by: str, values: Iterable[Any]) -> dict[Any, str]:
    ids = {v for v in values if v is not None}
    if group_by == "team" and ids:
        return {t.id: t.name for t in Team.objects.filter(id__in=ids).only("id", "name")}
    if group_by == "key":
        labels: dict[Any, str] = {None: "(no key)"}
        if ids:
            keys = VirtualKey.objects.filter(id__in=ids).select_related("team")
            labels |= {
                k.id: f"{k.name} · {k.team.name}" for k in keys.only("id", "name", "team__name")
            }
        return labels
    return {}
