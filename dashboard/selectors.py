"""Reads for the dashboard pages.

Usage figures (spend, tokens, requests, errors) come from billing.usage: its rollups
plus the live tail of the ledger, exact to the row, for any window. Latency
percentiles, which rollups cannot give, come from a bounded sample of the ledger (the
latest requests of the last day). The request log reads the ledger a page at a time,
on its indexes. The pages consume the dataclasses returned here, never querysets of
ledger rows.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.core.paginator import Page, Paginator
from django.db import connection
from django.db.models import (
    Count,
    IntegerField,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Value,
)
from django.db.models.functions import Coalesce, Trunc
from django.utils import timezone

from accounts.models import KeySecret, Membership, Team, VirtualKey
from billing import invoices, notifications, usage, webhooks
from billing.models import (
    Invoice,
    InvoiceLine,
    InvoiceLineKind,
    InvoiceStatus,
    LedgerEntry,
    LedgerKind,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from billing.periods import current_period, zone
from core.models import AuditEntry
from dashboard.access import Viewer
from gateway.models import ModelAlias, ModelDeployment, ModelGroup

PAGE_SIZE = 25


def paginate(
    rows: Sequence[Any] | QuerySet[Any], page: str | int | None, size: int = PAGE_SIZE
) -> Page[Any]:
    return Paginator(rows, size).get_page(page)


# --- windows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A half-open UTC interval [since, until), shown in `tz`."""

    since: datetime
    until: datetime
    tz: ZoneInfo
    label: str

    @property
    def days(self) -> float:
        return (self.until - self.since).total_seconds() / 86400

    @property
    def first_day(self) -> date:
        return self.since.astimezone(self.tz).date()

    @property
    def last_day(self) -> date:
        return (self.until - timedelta(microseconds=1)).astimezone(self.tz).date()


def period_window(kind: str, tz_name: str, now: datetime | None = None) -> Window:
    """The current budget period of that kind; a never-resetting credit shows this month."""
    now = now or timezone.now()
    period = current_period("monthly" if kind == "total" else kind, tz_name, now)
    assert period.start is not None and period.end is not None
    label = {"daily": "Today", "weekly": "This week"}.get(kind, "This month")
    return Window(period.start, period.end, zone(tz_name), label)


def trailing_window(days: int, tz_name: str, now: datetime | None = None) -> Window:
    """The last `days` calendar days in `tz`, today included."""
    now = now or timezone.now()
    tz = zone(tz_name)
    today = now.astimezone(tz).date()
    return day_window(today - timedelta(days=days - 1), today, tz_name, f"Last {days} days")


def day_window(first: date, last: date, tz_name: str, label: str = "") -> Window:
    tz = zone(tz_name)
    since = datetime(first.year, first.month, first.day, tzinfo=tz).astimezone(UTC)
    after = last + timedelta(days=1)
    until = datetime(after.year, after.month, after.day, tzinfo=tz).astimezone(UTC)
    return Window(since, until, tz, label or f"{first:%d %b %Y} to {last:%d %b %Y}")


# --- usage -----------------------------------------------------------------------------------
# Spend, tokens, requests and errors come from billing.usage: the rollups plus the live
# tail of the ledger, exact to the row whatever the window. Latency cannot (the rollups
# keep no histograms), so it is read from the ledger itself, bounded twice: the last
# LATENCY_HOURS of the window, and the latest LATENCY_ROWS requests of those. The pages
# say which requests the percentiles describe.

LATENCY_HOURS = 24
LATENCY_ROWS = 20_000
# Regrouping hourly rollups into local days reads 24 times the rows of the daily ones
# (which are UTC days): done for one team or key over a month at most; otherwise the
# charts show UTC days and say so.
LOCAL_DAYS_MAX_DAYS = 35


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


def _ledger(scope: LedgerScope) -> QuerySet[LedgerEntry]:
    rows = LedgerEntry.objects.all()
    if scope.window is not None:
        rows = rows.filter(started_at__gte=scope.window.since, started_at__lt=scope.window.until)
    if scope.viewer_q is not None:
        rows = rows.filter(scope.viewer_q)
    if scope.team_id is not None:
        rows = rows.filter(team_id=scope.team_id)
    if scope.key_id is not None:
        rows = rows.filter(key_id=scope.key_id)
    if scope.model:
        rows = rows.filter(model=scope.model)
    if scope.tag:
        rows = rows.filter(tags__contains=[scope.tag])
    if scope.status:
        rows = rows.filter(status=scope.status)
    return rows


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
class _Plan:
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


def _plan(scope: UsageScope, visible: Visible | None) -> _Plan:
    team_id, key_id = scope.team_id, scope.key_id
    if visible is None or (team_id is not None and team_id in visible.teams):
        return _Plan(team_id, key_id, None)
    if key_id is not None and key_id in visible.keys:
        return _Plan(team_id, key_id, None)
    if team_id is None and key_id is None:
        if not visible.teams and not visible.keys:
            return _Plan(None, None, visible, nothing=True)
        if len(visible.teams) == 1 and not visible.keys:
            return _Plan(next(iter(visible.teams)), None, None)
        if not visible.teams and len(visible.keys) == 1:
            return _Plan(None, next(iter(visible.keys)), None)
    return _Plan(team_id, key_id, visible)


def _report(
    scope: UsageScope, plan: _Plan, *, dims: Sequence[str], bucket: str | None
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


# --- chart axes ----------------------------------------------------------------------------------


def _offsets(window: Window) -> set[timedelta]:
    """The window's UTC offsets at each local midnight."""
    out = set()
    day = window.first_day
    while day <= window.last_day:
        offset = datetime(day.year, day.month, day.day, tzinfo=window.tz).utcoffset()
        out.add(offset or timedelta(0))
        day += timedelta(days=1)
    return out


@dataclass(frozen=True)
class Axis:
    """The buckets of a chart, and how billing.usage's buckets fall into them.

    `source` is the bucket read from billing.usage (UTC hours or UTC days). Days and
    weeks are calendar days in `tz`: the window's timezone, or UTC when regrouping
    hours into local days would cost too much (`utc_days`).
    """

    kind: str  # hour | day | week
    source: str  # hour | day
    tz: ZoneInfo
    starts: list[datetime]
    utc_days: bool = False

    def _position(self, moment: datetime) -> Any:
        if self.kind == "hour":
            return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        day = moment.astimezone(self.tz).date()
        return day - timedelta(days=day.weekday()) if self.kind == "week" else day

    def index(self, moment: datetime) -> int | None:
        positions = self.__dict__.get("_positions")
        if positions is None:
            positions = {self._position(start): i for i, start in enumerate(self.starts)}
            object.__setattr__(self, "_positions", positions)
        return positions.get(self._position(moment))

    def label(self, start: datetime) -> str:
        if self.kind == "hour":
            return f"{start:%d %b %H:%M}" if start.minute else f"{start:%d %b %H:00}"
        return f"{start:%d %b}"


def axis_for(window: Window, kind: str, *, narrow: bool) -> Axis:
    if kind == "hour":
        # UTC hours (what the rollups hold), shown in the window's timezone.
        starts = []
        cursor = window.since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        while cursor < window.until:
            starts.append(cursor.astimezone(window.tz))
            cursor += timedelta(hours=1)
        return Axis("hour", "hour", window.tz, starts)
    offsets = _offsets(window)
    if offsets == {timedelta(0)}:  # UTC itself, or London in winter
        tz, source, utc_days = window.tz, "day", False
    elif (
        kind == "day"
        and narrow
        and window.days <= LOCAL_DAYS_MAX_DAYS
        # Local midnights on UTC hours (not India's or Nepal's): whole hours regroup.
        and all(offset % timedelta(hours=1) == timedelta(0) for offset in offsets)
    ):
        tz, source, utc_days = window.tz, "hour", False
    else:
        tz, source, utc_days = ZoneInfo("UTC"), "day", True
    first = window.since.astimezone(tz).date()
    last = (window.until - timedelta(microseconds=1)).astimezone(tz).date()
    if kind == "week":
        first -= timedelta(days=first.weekday())
    step = 7 if kind == "week" else 1
    starts = [
        datetime(d.year, d.month, d.day, tzinfo=tz)
        for d in (first + timedelta(days=i) for i in range(0, (last - first).days + 1, step))
    ]
    return Axis(kind, source, tz, starts, utc_days)


def bucket_for(window: Window) -> str:
    if window.days <= 2:
        return "hour"
    return "day" if window.days <= 92 else "week"


# --- totals and the overview ---------------------------------------------------------------------


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
class ModelUsage:
    model: str
    requests: int
    tokens: int
    spend_micro_usd: int


@dataclass(frozen=True)
class KeyUsage:
    key_id: int | None
    name: str
    team_name: str
    requests: int
    spend_micro_usd: int


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


@dataclass
class Overview:
    totals: Totals
    latency: Latency
    axis: Axis
    days: list[date]
    # model → spend per day, aligned with `days`
    spend_by_model: dict[str, list[int]]
    requests_by_day: list[int]
    errors_by_day: list[int]
    top_models: list[ModelUsage]
    top_keys: list[KeyUsage]
    # Spend per team in this window (within the viewer's scope).
    spend_by_team: dict[int, int]

    @property
    def p50_ms(self) -> int | None:
        return self.latency.p50_ms

    @property
    def p95_ms(self) -> int | None:
        return self.latency.p95_ms


def usage_overview(scope: UsageScope, *, top: int = 5) -> Overview:
    """Totals, spend per day and model, top models and keys (billing.usage), and latency."""
    visible = visible_usage(scope.viewer)
    plan = _plan(scope, visible)
    axis = axis_for(scope.window, "day", narrow=plan.narrow)
    days = [start.date() for start in axis.starts]
    totals = Totals()
    spend_by_model: dict[str, list[int]] = {}
    requests_by_day = [0] * len(days)
    errors_by_day = [0] * len(days)
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    # Two calls, each with few groups: grouping by day, key and model at once makes
    # tens of thousands of groups on a busy gateway, and Python's share of reading
    # them costs more than the second read of the ledger's live tail.
    by_day_model = _report(scope, plan, dims=("model",), bucket=axis.source)
    by_key = _report(scope, plan, dims=("team_id", "key_id"), bucket=None)
    for row in by_day_model:
        totals.add(row)
        spend = row["charged_cost_micro_usd"]
        i = axis.index(row["bucket_start"])
        if i is not None:
            series = spend_by_model.setdefault(row["model"], [0] * len(days))
            series[i] += spend
            requests_by_day[i] += row["requests"]
            errors_by_day[i] += row["errors"]
        agg = per_model[row["model"]]
        agg[0] += row["requests"]
        agg[1] += row["prompt_tokens"] + row["completion_tokens"]
        agg[2] += spend
    per_key: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    spend_by_team: dict[int, int] = defaultdict(int)
    for row in by_key:
        agg = per_key[(row["team_id"], row["key_id"])]
        agg[0] += row["charged_cost_micro_usd"]
        agg[1] += row["requests"]
        spend_by_team[row["team_id"]] += row["charged_cost_micro_usd"]
    top_models = sorted(
        (ModelUsage(model, *values) for model, values in per_model.items()),
        key=lambda m: (-m.spend_micro_usd, -m.requests, m.model),
    )[:top]
    top_keys = sorted(per_key.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))[:top]
    return Overview(
        totals=totals,
        latency=latency_sample(scope, visible),
        axis=axis,
        days=days,
        spend_by_model=spend_by_model,
        requests_by_day=requests_by_day,
        errors_by_day=errors_by_day,
        top_models=top_models,
        top_keys=_key_usage(
            [
                {"key_id": key_id or None, "spend": spend, "requests": requests}
                for (_team, key_id), (spend, requests) in top_keys
            ]
        ),
        spend_by_team=dict(spend_by_team),
    )


def _key_usage(grouped: list[dict[str, Any]]) -> list[KeyUsage]:
    ids = [r["key_id"] for r in grouped if r["key_id"] is not None]
    names = (
        {
            key.id: key
            for key in VirtualKey.objects.filter(id__in=ids)
            .select_related("team")
            .only("id", "name", "team__name")
        }
        if ids
        else {}
    )
    out = []
    for row in grouped:
        key = names.get(row["key_id"])
        out.append(
            KeyUsage(
                key_id=row["key_id"],
                name=key.name
                if key
                else ("(no key)" if row["key_id"] is None else "(deleted key)"),
                team_name=key.team.name if key else "",
                requests=row["requests"],
                spend_micro_usd=row["spend"] or 0,
            )
        )
    return out


# --- latency -----------------------------------------------------------------------------------

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
    rows = _ledger(
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


# --- the usage explorer --------------------------------------------------------------------------


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
    plan = _plan(scope, visible_usage(scope.viewer))
    axis = axis_for(scope.window, kind, narrow=plan.narrow)
    dim = GROUP_FIELDS.get(group_by)
    sums: dict[tuple[int, Any], list[int]] = defaultdict(lambda: [0] * 5)
    for row in _report(scope, plan, dims=(dim,) if dim else (), bucket=axis.source):
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


# --- budgets ---------------------------------------------------------------------------------


def _period_spend(
    dimension: str,
    windows: dict[tuple[datetime | None, datetime | None], list[int]],
    earliest: dict[tuple[datetime | None, datetime | None], datetime],
    now: datetime,
) -> dict[int, int]:
    """Spend per team (or key) id in each id's window: one billing.usage call per window."""
    spent: dict[int, int] = defaultdict(int)
    for (start, end), ids in windows.items():
        # A never-resetting credit covers everything since the team (or key) began.
        since = start or earliest[(start, end)].astimezone(UTC).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        until = end or now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(
            hours=2
        )
        single = ids[0] if len(ids) == 1 else None
        rows = usage.usage_report(
            since=since,
            until=until,
            team_id=single if dimension == "team_id" else None,
            key_id=single if dimension == "key_id" else None,
            group_by=("team_id",) if dimension == "team_id" else ("key_id",),
        )
        wanted = set(ids)
        for row in rows:
            if row[dimension] in wanted:
                spent[row[dimension]] += row["charged_cost_micro_usd"]
    return dict(spent)


def team_period_spend(teams: Sequence[Team], now: datetime | None = None) -> dict[int, int]:
    """Each team's spend in its own current budget period: one billing.usage call per
    distinct period (teams sharing a period and timezone share the call)."""
    now = now or timezone.now()
    windows: dict[tuple[datetime | None, datetime | None], list[int]] = defaultdict(list)
    earliest: dict[tuple[datetime | None, datetime | None], datetime] = {}
    for team in teams:
        period = current_period(team.budget_period, team.timezone, now)
        span = (period.start, period.end)
        windows[span].append(team.id)
        earliest[span] = min(earliest.get(span, team.created_at), team.created_at)
    return _period_spend("team_id", windows, earliest, now)


def key_period_spend(keys: Sequence[VirtualKey], now: datetime | None = None) -> dict[int, int]:
    """Each key's spend in its own current budget period (team timezone)."""
    now = now or timezone.now()
    windows: dict[tuple[datetime | None, datetime | None], list[int]] = defaultdict(list)
    earliest: dict[tuple[datetime | None, datetime | None], datetime] = {}
    for key in keys:
        period = current_period(key.budget_period, key.team.timezone, now)
        span = (period.start, period.end)
        windows[span].append(key.id)
        earliest[span] = min(earliest.get(span, key.created_at), key.created_at)
    return _period_spend("key_id", windows, earliest, now)


@dataclass(frozen=True)
class TeamBudget:
    team: Team
    spent_micro_usd: int
    period_start: datetime | None = None
    period_end: datetime | None = None
    now: datetime | None = None

    @property
    def percent(self) -> float | None:
        if not self.team.budget_micro_usd:
            return None
        return 100 * self.spent_micro_usd / self.team.budget_micro_usd

    @property
    def level(self) -> str:
        """ok | warn | over, against the team's own alert thresholds (or the forecast)."""
        percent = self.percent
        if percent is None:
            return "ok"
        if percent >= 100:
            return "over"
        thresholds = [t for t in (self.team.alert_thresholds or []) if t < 100]
        warn_at = min(thresholds) if thresholds else 80
        return "warn" if percent >= warn_at else "ok"

    @property
    def crossed_threshold(self) -> int | None:
        """The highest alert threshold the spend has reached this period."""
        percent = self.percent
        if percent is None:
            return None
        crossed = [t for t in (self.team.alert_thresholds or []) if t <= percent]
        return max(crossed) if crossed else None

    @property
    def elapsed(self) -> float | None:
        """How much of the period has passed, 0 to 1 (None for a one-off credit)."""
        if self.period_start is None or self.period_end is None or self.now is None:
            return None
        total = (self.period_end - self.period_start).total_seconds()
        done = (self.now - self.period_start).total_seconds()
        return max(0.0, min(1.0, done / total)) if total > 0 else None

    @property
    def expected_percent(self) -> float | None:
        """Where spend would be now if the budget were used evenly over the period."""
        return None if self.elapsed is None or self.percent is None else 100 * self.elapsed

    @property
    def projected_micro_usd(self) -> int | None:
        """Spend at the end of the period at this period's rate so far."""
        elapsed = self.elapsed
        if not elapsed or elapsed < 0.02:
            return None
        return round(self.spent_micro_usd / elapsed)

    @property
    def projected_over(self) -> bool:
        projected = self.projected_micro_usd
        budget = self.team.budget_micro_usd
        return bool(budget and projected and projected > budget)

    @property
    def period_last_day(self) -> date | None:
        if self.period_end is None:
            return None
        return (
            (self.period_end - timedelta(microseconds=1))
            .astimezone(zone(self.team.timezone))
            .date()
        )

    @property
    def remaining_micro_usd(self) -> int | None:
        budget = self.team.budget_micro_usd
        return None if budget is None else max(0, budget - self.spent_micro_usd)


def team_budgets(
    teams: Sequence[Team],
    known: Window | None = None,
    spent_in_known: dict[int, int] | None = None,
) -> list[TeamBudget]:
    """Each team's spend in its own current period.

    Teams whose period is exactly `known` (the window a caller already summed per
    team, e.g. the overview's) reuse those sums instead of reading the ledger again.
    """
    reuse: dict[int, int] = {}
    if known is not None and spent_in_known is not None:
        for team in teams:
            period = current_period(team.budget_period, team.timezone, timezone.now())
            if (period.start, period.end) == (known.since, known.until):
                reuse[team.id] = spent_in_known.get(team.id, 0)
    spent = team_period_spend([t for t in teams if t.id not in reuse]) | reuse
    now = timezone.now()
    out = []
    for team in teams:
        period = current_period(team.budget_period, team.timezone, now)
        out.append(TeamBudget(team, spent.get(team.id, 0), period.start, period.end, now))
    return out


# --- teams and members ---------------------------------------------------------------------------


def visible_teams(viewer: Viewer) -> QuerySet[Team]:
    teams = Team.objects.all()
    ids = viewer.visible_team_ids()
    return teams if ids is None else teams.filter(id__in=ids)


def teams_with_counts(viewer: Viewer) -> QuerySet[Team]:
    members = (
        Membership.objects.filter(team_id=OuterRef("pk"))
        .order_by()
        .values("team_id")
        .annotate(n=Count("*"))
        .values("n")
    )
    active_keys = (
        VirtualKey.objects.filter(team_id=OuterRef("pk"), revoked_at__isnull=True)
        .order_by()
        .values("team_id")
        .annotate(n=Count("*"))
        .values("n")
    )
    return visible_teams(viewer).annotate(
        member_count=Coalesce(Subquery(members, output_field=IntegerField()), Value(0)),
        active_key_count=Coalesce(Subquery(active_keys, output_field=IntegerField()), Value(0)),
    )


def team_members(team: Team) -> QuerySet[Membership]:
    return Membership.objects.filter(team=team).select_related("user").order_by("user__username")


# --- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFilter:
    team_id: int | None = None
    status: str = "active"  # active | revoked | all
    search: str = ""


def keys_for(viewer: Viewer, filters: KeyFilter) -> QuerySet[VirtualKey]:
    """Keys with their newest secret's last 4 characters and last use, in one query."""
    keys = VirtualKey.objects.select_related("team", "owner")
    scope = viewer.keys_q()
    if scope is not None:
        keys = keys.filter(scope)
    if filters.team_id is not None:
        keys = keys.filter(team_id=filters.team_id)
    if filters.status == "active":
        keys = keys.filter(revoked_at__isnull=True)
    elif filters.status == "revoked":
        keys = keys.filter(revoked_at__isnull=False)
    if filters.search:
        keys = keys.filter(name__icontains=filters.search)
    return with_key_hints(keys).order_by("-created_at", "-id")


def with_key_hints(keys: QuerySet[VirtualKey]) -> QuerySet[VirtualKey]:
    newest_secret = KeySecret.objects.filter(key_id=OuterRef("pk")).order_by("-created_at", "-id")
    # The latest ledger row of the key, found by a backward scan of (key_id, started_at).
    last_row = LedgerEntry.objects.filter(key_id=OuterRef("pk")).order_by("-started_at")
    return keys.annotate(
        last4=Subquery(newest_secret.values("last4")[:1]),
        last_used_at=Subquery(last_row.values("started_at")[:1]),
    )


@dataclass(frozen=True)
class KeyRow:
    key: VirtualKey
    spent_micro_usd: int

    @property
    def percent(self) -> float | None:
        limit = self.key.max_budget_micro_usd
        return 100 * self.spent_micro_usd / limit if limit else None


def key_rows(keys: Sequence[VirtualKey]) -> list[KeyRow]:
    spent = key_period_spend(keys)
    return [KeyRow(key, spent.get(key.id, 0)) for key in keys]


KEY_OPTIONS_LIMIT = 200


def key_options(viewer: Viewer, team_id: int | None) -> list[tuple[int, str]]:
    """Keys to pick in a filter: the viewer's, newest first, at most KEY_OPTIONS_LIMIT."""
    keys = VirtualKey.objects.select_related("team").only("id", "name", "team__name")
    scope = viewer.keys_q()
    if scope is not None:
        keys = keys.filter(scope)
    if team_id is not None:
        keys = keys.filter(team_id=team_id)
    return [
        (k.id, f"{k.name} · {k.team.name}")
        for k in keys.order_by("-created_at", "-id")[:KEY_OPTIONS_LIMIT]
    ]


def key_secrets(key: VirtualKey) -> list[KeySecret]:
    """The key's secrets (hint and expiry only; the hashes are never shown)."""
    return list(key.secrets.only("id", "key_id", "last4", "expires_at", "created_at")[:20])


def model_names() -> list[str]:
    names = set(ModelDeployment.objects.values_list("name", flat=True))
    names |= set(ModelAlias.objects.values_list("alias", flat=True))
    return sorted(names)


# --- models --------------------------------------------------------------------------------------


def deployments() -> QuerySet[ModelDeployment]:
    return ModelDeployment.objects.order_by("name", "id")


def aliases() -> QuerySet[ModelAlias]:
    return ModelAlias.objects.order_by("alias")


def groups_by_name(names: Iterable[str]) -> dict[str, ModelGroup]:
    return {g.name: g for g in ModelGroup.objects.filter(name__in=set(names))}


# --- request log ----------------------------------------------------------------------------------


@dataclass
class LogPage:
    rows: list[LedgerEntry]
    next_cursor: str
    key_names: dict[int, str] = field(default_factory=dict)
    team_names: dict[int, str] = field(default_factory=dict)

    @property
    def entries(self) -> list[tuple[LedgerEntry, str, str]]:
        return [
            (
                row,
                self.key_names.get(row.key_id, "") if row.key_id is not None else "",
                self.team_names.get(row.team_id, ""),
            )
            for row in self.rows
        ]


def encode_cursor(row: LedgerEntry) -> str:
    raw = f"{row.started_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, ident = raw.partition("|")
        return datetime.fromisoformat(stamp), int(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def request_log(scope: LedgerScope, *, cursor: str = "", limit: int = 50) -> LogPage:
    """Newest first, keyset-paginated: a page costs the same on row 50 as on row 500,000."""
    rows = _ledger(scope)
    position = decode_cursor(cursor) if cursor else None
    if position is not None:
        stamp, ident = position
        rows = rows.filter(Q(started_at__lt=stamp) | Q(started_at=stamp, id__lt=ident))
    page = list(rows.order_by("-started_at", "-id")[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    key_ids = {r.key_id for r in page if r.key_id is not None}
    team_ids = {r.team_id for r in page}
    return LogPage(
        rows=page,
        next_cursor=encode_cursor(page[-1]) if more else "",
        key_names=dict(VirtualKey.objects.filter(id__in=key_ids).values_list("id", "name"))
        if key_ids
        else {},
        team_names=dict(Team.objects.filter(id__in=team_ids).values_list("id", "name"))
        if team_ids
        else {},
    )


def ledger_row(viewer: Viewer, row_id: int) -> LedgerEntry | None:
    rows = LedgerEntry.objects.filter(id=row_id)
    scope = viewer.ledger_q()
    if scope is not None:
        rows = rows.filter(scope)
    return rows.first()


def request_attempts(row: LedgerEntry, viewer: Viewer) -> list[LedgerEntry]:
    """Every attempt (retries, fallbacks) of the same client request."""
    rows = LedgerEntry.objects.filter(request_id=row.request_id)
    scope = viewer.ledger_q()
    if scope is not None:
        rows = rows.filter(scope)
    return list(rows.order_by("attempt")[:20])


# --- audit ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    object_type: str = ""
    team_id: int | None = None
    actor: str = ""


@dataclass(frozen=True)
class Change:
    field: str
    before: Any
    after: Any


def audit_entries(viewer: Viewer, filters: AuditFilter) -> QuerySet[AuditEntry]:
    entries = AuditEntry.objects.all()
    scope = viewer.audit_q()
    if scope is not None:
        entries = entries.filter(scope)
    if filters.object_type:
        entries = entries.filter(object_type=filters.object_type)
    if filters.team_id is not None:
        entries = entries.filter(team_id=filters.team_id)
    if filters.actor:
        entries = entries.filter(actor=filters.actor)
    return entries.order_by("-created_at", "-id")


# Timestamps the entry's own time already says (computed_at: an invoice's last recompute).
_NOISE = {"updated_at", "created_at", "computed_at"}


def audit_changes(entry: AuditEntry) -> list[Change]:
    before: dict[str, Any] = entry.before or {}
    after: dict[str, Any] = entry.after or {}
    fields = [f for f in dict.fromkeys([*before, *after]) if f not in _NOISE]
    if entry.action in ("create", "delete"):
        # A summary of what was there: the fields that hold something.
        values = after if entry.action == "create" else before
        return [
            Change(f, before.get(f), after.get(f))
            for f in fields
            if values.get(f) not in (None, "", [], {}, False) and f != "id"
        ]
    return [Change(f, before.get(f), after.get(f)) for f in fields if before.get(f) != after.get(f)]


# --- invoices ------------------------------------------------------------------------------------

# What a team admin may read: invoices that were issued to the team (drafts are finance's).
ISSUED_STATUSES = (InvoiceStatus.FINALIZED, InvoiceStatus.VOID)


@dataclass(frozen=True)
class InvoiceQuery:
    team_id: int | None = None
    status: str = ""
    period: str = ""  # "2026-03"


def invoices_for(viewer: Viewer, query: InvoiceQuery) -> QuerySet[Invoice]:
    """billing.invoices.invoice_list, narrowed to what the viewer may read."""
    rows = invoices.invoice_list(
        team_id=query.team_id, status=query.status or None, period=query.period or None
    )
    if not viewer.can_manage_invoices:
        rows = rows.filter(team_id__in=viewer.admin_team_ids, status__in=ISSUED_STATUSES)
    return rows


# Token kinds as (line field, unit price key, label).
_TOKEN_KINDS = (
    ("prompt_tokens", "input", "Input"),
    ("completion_tokens", "output", "Output"),
    ("cached_read_tokens", "cached_input", "Cached input"),
    ("cache_write_tokens", "cache_write", "Cache write"),
    ("reasoning_tokens", "reasoning", "Reasoning"),
)


@dataclass(frozen=True)
class Quantity:
    label: str
    tokens: int
    unit_price: str  # USD per 1M tokens, as configured when the invoice was computed ("" unknown)


@dataclass(frozen=True)
class InvoiceLineRow:
    line: InvoiceLine

    @property
    def markup_micro_usd(self) -> int:
        """What the team's markup (negative: discount) adds to the list amount."""
        return self.line.amount_micro_usd - self.line.list_amount_micro_usd

    @property
    def quantities(self) -> list[Quantity]:
        prices = self.line.unit_prices or {}
        out = []
        for field_name, price_key, label in _TOKEN_KINDS:
            tokens = getattr(self.line, field_name)
            # Input and output always; the other kinds where there are some.
            if tokens or field_name in ("prompt_tokens", "completion_tokens"):
                out.append(Quantity(label, tokens, str(prices.get(price_key, ""))))
        return out


@dataclass(frozen=True)
class InvoiceDetail:
    invoice: Invoice
    usage_lines: list[InvoiceLineRow]
    adjustment_lines: list[InvoiceLineRow]

    @property
    def is_discount(self) -> bool:
        return self.invoice.markup_micro_usd < 0

    @property
    def adjustments_micro_usd(self) -> int:
        return sum(row.line.amount_micro_usd for row in self.adjustment_lines)


def invoice_detail(invoice: Invoice) -> InvoiceDetail:
    """The lines of an invoice from billing.invoices.invoice_get (already fetched)."""
    lines = [InvoiceLineRow(line) for line in invoice.lines.all()]
    return InvoiceDetail(
        invoice=invoice,
        usage_lines=[r for r in lines if r.line.kind == InvoiceLineKind.USAGE],
        adjustment_lines=[r for r in lines if r.line.kind == InvoiceLineKind.ADJUSTMENT],
    )


# --- webhooks and alert recipients ---------------------------------------------------------------
# billing.webhooks has services for endpoints but no selectors: these read its tables,
# and never the encrypted signing secret.

_ENDPOINT_FIELDS = (
    "id",
    "team_id",
    "public_id",
    "url",
    "description",
    "events",
    "secret_last4",
    "enabled",
    "created_at",
    "updated_at",
)


def webhook_endpoints(team: Team) -> list[WebhookEndpoint]:
    """A team's endpoints (at most billing's limit) with their latest delivery."""
    latest = WebhookDelivery.objects.filter(endpoint_id=OuterRef("pk")).order_by("-id")
    return list(
        WebhookEndpoint.objects.filter(team_id=team.id)
        .only(*_ENDPOINT_FIELDS)
        .annotate(
            last_status=Subquery(latest.values("status")[:1]),
            last_event=Subquery(latest.values("event_type")[:1]),
            last_at=Subquery(latest.values("created_at")[:1]),
        )
        .order_by("id")[: webhooks.MAX_ENDPOINTS_PER_TEAM]
    )


def webhook_endpoint(team: Team, public_id: str) -> WebhookEndpoint | None:
    return WebhookEndpoint.objects.filter(team_id=team.id, public_id=public_id[:40]).first()


def webhook_count(team: Team) -> int:
    return WebhookEndpoint.objects.filter(team_id=team.id).count()


def webhook_deliveries(endpoint: WebhookEndpoint) -> QuerySet[WebhookDelivery]:
    """Newest first, each with every attempt (one query per page for all the attempts)."""
    return (
        WebhookDelivery.objects.filter(endpoint_id=endpoint.id)
        .defer("payload")
        .prefetch_related(Prefetch("log", queryset=WebhookAttempt.objects.order_by("number")))
        .order_by("-created_at", "-id")
    )


def alert_recipients(team: Team) -> list[str]:
    return list(notifications.notification_settings_get(team_id=team.id).alert_emails or [])
