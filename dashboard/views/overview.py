"""The overview: this period's spend against budgets, traffic, errors, latency, top users."""

from __future__ import annotations

from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from accounts import selectors as account_selectors
from dashboard import charts
from dashboard.access import DashboardRequest, dashboard_view
from dashboard.formatting import usd_axis
from dashboard.forms import OverviewFilter
from dashboard.selectors.common import paginate, visible_teams
from dashboard.selectors.keys import KeyFilter, KeyRow, key_rows, keys_for
from dashboard.selectors.overview import usage_overview
from dashboard.selectors.teams import TeamBudget, team_budgets
from dashboard.selectors.usage import UsageScope
from dashboard.views.common import choices, default_window, page, team_options

BUDGETS_PER_PAGE = 6


@require_GET
@dashboard_view
def overview(request: DashboardRequest) -> HttpResponse:
    viewer = request.viewer
    teams = team_options(viewer)
    form = OverviewFilter(request.GET, teams=choices(teams))
    form.is_valid()
    team_id = form.cleaned_data.get("team") if "team" not in form.errors else None
    team = next((t for t in teams if t.id == team_id), None)
    range_name = form.cleaned_data.get("range") or "period"
    window = default_window(team, teams, range_name)
    data = usage_overview(UsageScope(viewer=viewer, window=window, team_id=team_id))

    labels = [f"{day:%d %b}" for day in data.days]
    chart = charts.stacked_bars(
        labels,
        {model: [float(v) for v in values] for model, values in data.spend_by_model.items()},
        fmt=usd_axis,
        title="Spend per day by model" + (" (UTC days)" if data.axis.utc_days else ""),
        height=340,
    )
    # Trends up to today: days still ahead in the period would read as a collapse.
    today = timezone.now().astimezone(data.axis.tz).date()
    shown = sum(1 for day in data.days if day <= today)
    spend_by_day = [sum(v[i] for v in data.spend_by_model.values()) for i in range(shown)]
    errors = [
        e / r if r else 0.0
        for e, r in zip(data.errors_by_day[:shown], data.requests_by_day[:shown], strict=True)
    ]
    sparks = {
        "spend": charts.sparkline(spend_by_day, title="Spend per day"),
        "requests": charts.sparkline(
            data.requests_by_day[:shown], title="Requests per day", color=charts.PALETTE[1]
        ),
        "errors": charts.sparkline(errors, title="Error rate per day", color=charts.PALETTE[4]),
    }

    # Budgets: per team for those who run teams; per own key for plain members.
    budgets_page = None
    budgets: list[TeamBudget] = []
    key_budgets: list[KeyRow] | None = None
    if team is not None and viewer.can_view_team_details(team.id):
        budget_teams = account_selectors.teams([team.id])
    elif team is None and (viewer.sees_all_teams or viewer.admin_team_ids):
        budget_teams = (
            visible_teams(viewer).filter(id__in=viewer.admin_team_ids)
            if not viewer.sees_all_teams
            else account_selectors.teams()
        )
    else:
        budget_teams = None
    if budget_teams is not None:
        budgets_page = paginate(
            budget_teams.order_by("name"), request.GET.get("bpage"), BUDGETS_PER_PAGE
        )
        # Budget rows are teams whose every ledger row this viewer sees, so the
        # overview's per-team sums are their spend whenever the window is their period.
        budgets = team_budgets(
            list(budgets_page.object_list), known=window, spent_in_known=data.spend_by_team
        )
    else:
        keys = keys_for(viewer, KeyFilter(team_id=team_id))
        budgets_page = paginate(keys, request.GET.get("bpage"), BUDGETS_PER_PAGE)
        key_budgets = key_rows(list(budgets_page.object_list))

    return page(
        request,
        "dashboard/overview.html",
        {
            "form": form,
            "team": team,
            "window": window,
            "data": data,
            "chart": chart,
            "sparks": sparks,
            "budgets": budgets,
            "key_budgets": key_budgets,
            "budgets_page": budgets_page,
        },
        section="overview",
    )
