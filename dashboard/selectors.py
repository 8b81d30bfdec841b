"""Reads for the dashboard pages.

Usage figures are aggregated in SQL straight from the ledger, always inside a
bounded time window, on the ledger's indexes ((team_id, started_at),
(key_id, started_at), (model, started_at), (started_at)). When billing exposes
rollup selectors, only the functions under "usage" change: the pages consume the
dataclasses returned here, never querysets of ledger rows.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.core.paginator import Page, Paginator
from django.db import connection, transaction
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, Trunc
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind, LedgerStatus
from billing.periods import current_period, zone
from dashboard.access import Viewer
from dashboard.models import Membership
from gateway.models import (
    AuditEntry,
    KeySecret,
    ModelAlias,
    ModelDeployment,
    ModelGroup,
    Team,
    VirtualKey,
)

PAGE_SIZE = 25
# Statuses counted as failures in error rates. A client that hung up is not an error
# of the gateway or the provider.
ERROR_STATUSES = (LedgerStatus.ERROR, LedgerStatus.PARTIAL)
_IS_CHARGE = Q(kind=LedgerKind.CHARGE)
_IS_ERROR = Q(kind=LedgerKind.CHARGE, status__in=ERROR_STATUSES)


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


@dataclass(frozen=True)
class LedgerScope:
    """Which ledger rows a figure covers: the viewer's rows, narrowed by the filters."""

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


@dataclass
class Overview:
    totals: Totals
    p50_ms: int | None
    p95_ms: int | None
    days: list[date]
    # model → spend per day, aligned with `days`
    spend_by_model: dict[str, list[int]]
    requests_by_day: list[int]
    errors_by_day: list[int]
    top_models: list[ModelUsage]
    top_keys: list[KeyUsage]
    # Spend per team in this window (within the viewer's scope).
    spend_by_team: dict[int, int]


def _percentile(histogram: list[tuple[int, int]], fraction: float) -> int | None:
    """Nearest-rank percentile from (value, count) pairs sorted by value."""
    total = sum(n for _, n in histogram)
    if not total:
        return None
    rank = max(1, int(-(-fraction * total // 1)))  # ceil, in integers
    seen = 0
    for value, n in histogram:
        seen += n
        if seen >= rank:
            return value
    return histogram[-1][0]


def _days(window: Window) -> list[date]:
    first = window.since.astimezone(window.tz).date()
    last = (window.until - timedelta(microseconds=1)).astimezone(window.tz).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def usage_overview(scope: LedgerScope, *, top: int = 5) -> Overview:
    """Totals, latency percentiles, spend per day and model, top models and keys."""
    assert scope.window is not None
    window = scope.window
    days = _days(window)
    index = {day: i for i, day in enumerate(days)}
    totals = Totals()
    spend_by_model: dict[str, list[int]] = {}
    requests_by_day = [0] * len(days)
    errors_by_day = [0] * len(days)
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    if connection.vendor == "postgresql":
        by_day_model, by_key, by_team, histogram = _overview_one_scan(scope)
    else:
        by_day_model, by_key, by_team, histogram = _overview_queries(scope)
    for row in by_day_model:
        spend, prompt, completion = row["spend"] or 0, row["prompt"] or 0, row["completion"] or 0
        totals.requests += row["requests"]
        totals.errors += row["errors"]
        totals.spend_micro_usd += spend
        totals.prompt_tokens += prompt
        totals.completion_tokens += completion
        day = row["day"].astimezone(window.tz).date()
        if day in index:
            series = spend_by_model.setdefault(row["model"], [0] * len(days))
            series[index[day]] += spend
            requests_by_day[index[day]] += row["requests"]
            errors_by_day[index[day]] += row["errors"]
        agg = per_model[row["model"]]
        agg[0] += row["requests"]
        agg[1] += prompt + completion
        agg[2] += spend
    top_models = sorted(
        (ModelUsage(model, *values) for model, values in per_model.items()),
        key=lambda m: (-m.spend_micro_usd, -m.requests, m.model),
    )[:top]
    return Overview(
        totals=totals,
        p50_ms=_percentile(histogram, 0.50),
        p95_ms=_percentile(histogram, 0.95),
        days=days,
        spend_by_model=spend_by_model,
        requests_by_day=requests_by_day,
        errors_by_day=errors_by_day,
        top_models=top_models,
        top_keys=_key_usage(
            sorted(by_key, key=lambda r: (-(r["spend"] or 0), -r["requests"]))[:top]
        ),
        spend_by_team={row["team_id"]: row["spend"] or 0 for row in by_team},
    )


_Rows = list[dict[str, Any]]
# Bits of GROUPING(day, model, key_id, team_id, latency_ms): 1 where a column is not grouped.
_BY_DAY_MODEL, _BY_KEY, _BY_TEAM, _BY_LATENCY = 0b00111, 0b11011, 0b11101, 0b11110
_ONE_SCAN_SQL = """
SELECT GROUPING(day, model, key_id, team_id, latency_ms),
       day, model, key_id, team_id, latency_ms,
       COUNT(*) FILTER (WHERE kind = 'charge'),
       COUNT(*) FILTER (WHERE kind = 'charge' AND status IN ('error', 'partial')),
       SUM(charged_cost_micro_usd), SUM(prompt_tokens), SUM(completion_tokens)
FROM ({inner}) AS scope
GROUP BY GROUPING SETS ((day, model), (key_id), (team_id), (latency_ms))
"""


@contextmanager
def _aggregating() -> Iterator[None]:
    """Settings for one large aggregate, in a transaction of its own.

    Postgres cannot estimate how many groups a day-truncated timestamp makes, so it
    assumes one per row and plans a sort of every row; a generous work_mem lets it
    hash instead (the tables hold a few thousand groups, a few MB; a larger one
    would spill to disk, not fail). JIT compilation costs more than it saves on a
    query that runs once for a few hundred milliseconds.
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL work_mem = '256MB'; SET LOCAL jit = off")
        yield


def _overview_one_scan(scope: LedgerScope) -> tuple[_Rows, _Rows, _Rows, list[tuple[int, int]]]:
    """Every overview figure from a single pass over the window's ledger rows.

    GROUPING SETS feed four hash tables from one scan (per day and model, per key,
    per team, and a histogram of whole milliseconds for exact percentiles), where
    separate queries would read the same rows four times.
    """
    assert scope.window is not None
    inner = (
        _ledger(scope)
        .annotate(day=Trunc("started_at", "day", tzinfo=scope.window.tz))
        .values(
            "day",
            "model",
            "key_id",
            "team_id",
            "latency_ms",
            "kind",
            "status",
            "charged_cost_micro_usd",
            "prompt_tokens",
            "completion_tokens",
        )
        .order_by()
    )
    inner_sql, params = inner.query.sql_with_params()
    # The ORM's own SQL, with its parameters passed separately: nothing typed by a
    # user is ever formatted into the string.
    sql = _ONE_SCAN_SQL.replace("{inner}", inner_sql)
    by_day_model: _Rows = []
    by_key: _Rows = []
    by_team: _Rows = []
    histogram: list[tuple[int, int]] = []
    with _aggregating(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        for row in cursor:
            grouping, day, model, key_id, team_id, latency = row[:6]
            # SUM(bigint) is numeric in Postgres: back to whole micro-USD and tokens.
            requests, errors, spend, prompt, out = (int(v or 0) for v in row[6:])
            if grouping == _BY_DAY_MODEL:
                by_day_model.append(
                    {
                        "day": day,
                        "model": model,
                        "requests": requests,
                        "errors": errors,
                        "spend": spend,
                        "prompt": prompt,
                        "completion": out,
                    }
                )
            elif grouping == _BY_KEY:
                by_key.append({"key_id": key_id, "spend": spend, "requests": requests})
            elif grouping == _BY_TEAM:
                by_team.append({"team_id": team_id, "spend": spend})
            elif grouping == _BY_LATENCY and requests:
                histogram.append((latency, requests))
    histogram.sort()
    return by_day_model, by_key, by_team, histogram


def _overview_queries(scope: LedgerScope) -> tuple[_Rows, _Rows, _Rows, list[tuple[int, int]]]:
    """The same figures with portable queries (SQLite has no GROUPING SETS)."""
    assert scope.window is not None
    rows = _ledger(scope)
    by_day_model = (
        rows.annotate(day=Trunc("started_at", "day", tzinfo=scope.window.tz))
        .values("day", "model")
        .annotate(
            requests=Count("id", filter=_IS_CHARGE),
            errors=Count("id", filter=_IS_ERROR),
            spend=Sum("charged_cost_micro_usd"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
        )
        .order_by()
    )
    by_key = (
        rows.values("key_id")
        .annotate(spend=Sum("charged_cost_micro_usd"), requests=Count("id", filter=_IS_CHARGE))
        .order_by()
    )
    by_team = rows.values("team_id").annotate(spend=Sum("charged_cost_micro_usd")).order_by()
    histogram = (
        rows.filter(_IS_CHARGE)
        .values_list("latency_ms")
        .annotate(n=Count("*"))
        .order_by("latency_ms")
    )
    return (
        [dict(row) for row in by_day_model],
        [dict(row) for row in by_key],
        [dict(row) for row in by_team],
        [(int(latency), int(n)) for latency, n in histogram],
    )


def _key_usage(grouped: _Rows) -> list[KeyUsage]:
    names = {
        key.id: key
        for key in VirtualKey.objects.filter(id__in=[r["key_id"] for r in grouped])
        .select_related("team")
        .only("id", "name", "team__name")
    }
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


@dataclass(frozen=True)
class SeriesRow:
    bucket: datetime
    group: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    spend_micro_usd: int
    avg_latency_ms: int | None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


GROUP_FIELDS = {"model": "model", "team": "team_id", "key": "key_id"}


def bucket_for(window: Window) -> str:
    if window.days <= 2:
        return "hour"
    return "day" if window.days <= 92 else "week"


def buckets(window: Window, kind: str) -> list[datetime]:
    """Every bucket start in the window, in the window's timezone."""
    start = window.since.astimezone(window.tz)
    if kind == "hour":
        current = start.replace(minute=0, second=0, microsecond=0)
        step = timedelta(hours=1)
    else:
        current = start.replace(hour=0, minute=0, second=0, microsecond=0)
        if kind == "week":
            current -= timedelta(days=current.weekday())
        step = timedelta(days=7 if kind == "week" else 1)
    out = []
    while current < window.until:
        out.append(current)
        # Calendar arithmetic in local time, so DST days stay aligned to midnight.
        naive = current.replace(tzinfo=None) + step
        current = naive.replace(tzinfo=window.tz)
    return out


def usage_series(scope: LedgerScope, *, bucket: str, group_by: str = "") -> list[SeriesRow]:
    """Requests, errors, tokens, spend and mean latency per time bucket (and group): 1-2 queries."""
    assert scope.window is not None
    group_field = GROUP_FIELDS.get(group_by)
    keys = ["bucket", group_field] if group_field else ["bucket"]
    grouped = (
        _ledger(scope)
        .annotate(bucket=Trunc("started_at", bucket, tzinfo=scope.window.tz))
        .values(*keys)
        .annotate(
            requests=Count("id", filter=_IS_CHARGE),
            errors=Count("id", filter=_IS_ERROR),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            spend=Sum("charged_cost_micro_usd"),
            latency=Sum("latency_ms", filter=_IS_CHARGE),
        )
        .order_by("bucket", *([group_field] if group_field else []))
    )
    with _aggregating():
        rows = list(grouped)
    labels = group_labels(group_by, [row[group_field] for row in rows] if group_field else [])
    return [
        SeriesRow(
            bucket=row["bucket"].astimezone(scope.window.tz),
            group=labels.get(row[group_field], str(row[group_field])) if group_field else "",
            requests=row["requests"],
            errors=row["errors"],
            prompt_tokens=row["prompt"] or 0,
            completion_tokens=row["completion"] or 0,
            spend_micro_usd=row["spend"] or 0,
            avg_latency_ms=round(row["latency"] / row["requests"]) if row["requests"] else None,
        )
        for row in rows
    ]


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


def _window_q(field_name: str, ids: list[int], kind: str, tz_name: str, now: datetime) -> Q:
    period = current_period(kind, tz_name, now)
    q = Q(**{f"{field_name}__in": ids})
    if period.start is not None:
        q &= Q(started_at__gte=period.start, started_at__lt=period.end)
    return q


def team_period_spend(teams: Sequence[Team], now: datetime | None = None) -> dict[int, int]:
    """Each team's spend in its own current budget period: one query for the lot."""
    now = now or timezone.now()
    by_window: dict[tuple[str, str], list[int]] = defaultdict(list)
    for team in teams:
        by_window[(team.budget_period, team.timezone)].append(team.id)
    if not by_window:
        return {}
    q = Q()
    for (kind, tz_name), ids in by_window.items():
        q |= _window_q("team_id", ids, kind, tz_name, now)
    grouped = (
        LedgerEntry.objects.filter(q)
        .values("team_id")
        .annotate(spent=Sum("charged_cost_micro_usd"))
        .order_by()
    )
    return {row["team_id"]: row["spent"] or 0 for row in grouped}


def key_period_spend(keys: Sequence[VirtualKey], now: datetime | None = None) -> dict[int, int]:
    """Each key's spend in its own current budget period (team timezone): one query."""
    now = now or timezone.now()
    by_window: dict[tuple[str, str], list[int]] = defaultdict(list)
    for key in keys:
        by_window[(key.budget_period, key.team.timezone)].append(key.id)
    if not by_window:
        return {}
    q = Q()
    for (kind, tz_name), ids in by_window.items():
        q |= _window_q("key_id", ids, kind, tz_name, now)
    grouped = (
        LedgerEntry.objects.filter(q)
        .values("key_id")
        .annotate(spent=Sum("charged_cost_micro_usd"))
        .order_by()
    )
    return {row["key_id"]: row["spent"] or 0 for row in grouped if row["key_id"] is not None}


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


_NOISE = {"updated_at", "created_at"}


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
