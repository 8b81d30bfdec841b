"""The usage explorer (charts and a table over time, CSV export) and the request log."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, timedelta

from django.http import Http404, HttpResponse
from django.views.decorators.http import require_GET

from accounts import selectors as account_selectors
from accounts.models import Team, VirtualKey
from billing.csv_export import csv_amount, safe_writer
from dashboard import charts
from dashboard.access import DashboardRequest, dashboard_view, get_key_for_viewer
from dashboard.charts import Window, bucket_for, day_window
from dashboard.formatting import compact, duration_ms, usd_axis
from dashboard.forms import RequestLogFilter, UsageFilter
from dashboard.selectors.common import paginate
from dashboard.selectors.keys import key_options
from dashboard.selectors.request_log import ledger_row, request_attempts, request_log
from dashboard.selectors.usage import (
    LedgerScope,
    Series,
    SeriesRow,
    Totals,
    UsageScope,
    latency_sample,
    usage_series,
    visible_usage,
)
from dashboard.views.common import choices, default_window, page, team_options

TABLE_PAGE_SIZE = 25


@dataclass
class Explorer:
    form: UsageFilter
    scope: UsageScope
    series: Series
    team: Team | None
    key: VirtualKey | None

    @property
    def window(self) -> Window:
        return self.scope.window

    @property
    def rows(self) -> list[SeriesRow]:
        return self.series.rows


def _explore(request: DashboardRequest) -> Explorer:
    viewer = request.viewer
    teams = team_options(viewer)
    form = UsageFilter(request.GET, teams=choices(teams))
    form.is_valid()
    data = form.cleaned_data
    team = next((t for t in teams if t.id == data.get("team")), None)
    key = get_key_for_viewer(viewer, data["key"]) if data.get("key") else None
    window = default_window(team or (key.team if key else None), teams)
    since, until = data.get("since"), data.get("until")
    if form.is_valid() and (since or until):
        tz_name = window.tz.key
        first = since or window.since.astimezone(window.tz).date()
        last = until or (window.until.astimezone(window.tz).date())
        if first <= last:
            window = day_window(first, last, tz_name)
    scope = UsageScope(
        viewer=viewer,
        window=window,
        team_id=team.id if team else None,
        key_id=key.id if key else None,
        model=(data.get("model") or "").strip(),
        tag=(data.get("tag") or "").strip(),
    )
    series = usage_series(scope, kind=bucket_for(window), group_by=data.get("group_by") or "")
    # Show the dates in effect, whether typed or the default period.
    shown = request.GET.copy()
    shown["since"] = window.first_day.isoformat()
    shown["until"] = window.last_day.isoformat()
    form.data = shown
    return Explorer(form, scope, series, team, key)


@require_GET
@dashboard_view
def usage(request: DashboardRequest) -> HttpResponse:
    explorer = _explore(request)
    axis = explorer.series.axis
    labels = [axis.label(start) for start in axis.starts]
    empty = [0.0] * len(axis.starts)

    spend: dict[str, list[float]] = defaultdict(lambda: list(empty))
    tokens: dict[str, list[float]] = defaultdict(lambda: list(empty))
    requests: dict[str, list[float]] = defaultdict(lambda: list(empty))
    index = {start: i for i, start in enumerate(axis.starts)}
    for row in explorer.rows:
        i = index[row.bucket]
        group = row.group or "All"
        spend[group][i] += row.spend_micro_usd
        requests[group][i] += row.requests
        if row.group:
            tokens[group][i] += row.tokens
        else:
            tokens["Prompt"][i] += row.prompt_tokens
            tokens["Completion"][i] += row.completion_tokens

    def fmt_count(value: float) -> str:
        return compact(value)

    # Latency: the latest requests of the range's last day, per hour (see selectors).
    latency = latency_sample(explorer.scope, visible_usage(request.viewer))
    hours = []
    cursor = latency.since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while cursor < latency.until:
        hours.append(cursor)
        cursor += timedelta(hours=1)
    at = {hour: i for i, hour in enumerate(hours)}
    p50: list[float | None] = [None] * len(hours)
    p95: list[float | None] = [None] * len(hours)
    for hour, median, high in latency.by_hour:
        if hour in at:
            p50[at[hour]], p95[at[hour]] = median, high
    tz = explorer.window.tz
    context_charts = {
        "spend": charts.stacked_bars(labels, dict(spend), fmt=usd_axis, title="Spend"),
        "tokens": charts.stacked_bars(labels, dict(tokens), fmt=fmt_count, title="Tokens"),
        "requests": charts.stacked_bars(labels, dict(requests), fmt=fmt_count, title="Requests"),
        "latency": charts.line_chart(
            [f"{hour.astimezone(tz):%d %b %H:%M}" for hour in hours],
            {"p50": p50, "p95": p95},
            fmt=lambda v: duration_ms(v),
            title="Latency p50 and p95 per hour",
        ),
    }
    totals = Totals()
    for row in explorer.rows:
        totals.requests += row.requests
        totals.errors += row.errors
        totals.spend_micro_usd += row.spend_micro_usd
        totals.prompt_tokens += row.prompt_tokens
        totals.completion_tokens += row.completion_tokens
    table = paginate(list(reversed(explorer.rows)), request.GET.get("page"), TABLE_PAGE_SIZE)
    group_by = explorer.form.cleaned_data.get("group_by") or ""
    return page(
        request,
        "dashboard/usage.html",
        {
            "form": explorer.form,
            "window": explorer.window,
            "axis": axis,
            "bucket": axis.kind,
            "charts": context_charts,
            "latency": latency,
            "totals": totals,
            "page_obj": table,
            "grouped": bool(group_by),
            "by_tag": group_by == "tag",
            "key": explorer.key,
            "key_options": key_options(request.viewer, explorer.team.id if explorer.team else None),
            "export_query": request.GET.urlencode(),
        },
        section="usage",
    )


CSV_COLUMNS = [
    "bucket_start",
    "group",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "spend_usd",
]


@require_GET
@dashboard_view
def usage_csv(request: DashboardRequest) -> HttpResponse:
    """Exactly the rows the explorer's table shows for the same filters, all pages.

    `bucket_start` carries its UTC offset: local days, or UTC days where the page says so.
    """
    explorer = _explore(request)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="usage.csv"'
    writer = safe_writer(response)  # group labels (tags, names) are formula-proofed
    writer.writerow(CSV_COLUMNS)
    for row in explorer.rows:
        writer.writerow(
            [
                row.bucket.isoformat(),
                row.group,
                row.requests,
                row.errors,
                row.prompt_tokens,
                row.completion_tokens,
                csv_amount(row.spend_micro_usd),
            ]
        )
    return response


# --- request log ---------------------------------------------------------------------------------


@require_GET
@dashboard_view
def request_list(request: DashboardRequest) -> HttpResponse:
    viewer = request.viewer
    teams = team_options(viewer)
    form = RequestLogFilter(request.GET, teams=choices(teams))
    form.is_valid()
    data = form.cleaned_data
    key = get_key_for_viewer(viewer, data["key"]) if data.get("key") else None
    scope = LedgerScope(
        viewer_q=viewer.ledger_q(),
        team_id=data.get("team"),
        key_id=key.id if key else None,
        model=(data.get("model") or "").strip(),
        status=data.get("status") or "",
    )
    log = request_log(scope, cursor=request.GET.get("cursor", "")[:200])
    return page(
        request,
        "dashboard/requests/list.html",
        {
            "form": form,
            "log": log,
            "key": key,
            "key_options": key_options(viewer, data.get("team")),
            "cursor": request.GET.get("cursor", ""),
        },
        section="requests",
    )


@require_GET
@dashboard_view
def request_detail(request: DashboardRequest, row_id: int) -> HttpResponse:
    row = ledger_row(request.viewer, row_id)
    if row is None:
        raise Http404("No such request.")
    key = account_selectors.key_get(row.key_id) if row.key_id else None
    team = key.team if key else account_selectors.team_get(row.team_id)
    return page(
        request,
        "dashboard/requests/detail.html",
        {
            "row": row,
            "key": key,
            "team": team,
            "attempts": request_attempts(row, request.viewer),
        },
        section="requests",
    )
