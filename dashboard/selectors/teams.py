"""The teams pages: teams with their counts, members, budgets this period, alert recipients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.models import Membership, Team, VirtualKey
from billing import notifications
from billing.periods import current_period, zone
from billing.selectors import period_spends
from dashboard.access import Viewer
from dashboard.charts import Window
from dashboard.selectors.common import visible_teams


def team_period_spend(teams: Sequence[Team], now: datetime | None = None) -> dict[int, int]:
    """Each team's spend in its own current budget period: one billing.usage call per
    distinct period (teams sharing a period and timezone share the call)."""
    owners = ((team.id, team.budget_period, team.timezone, team.created_at) for team in teams)
    return period_spends("team_id", owners, now)


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


def alert_recipients(team: Team) -> list[str]:
    return list(notifications.notification_settings_get(team_id=team.id).alert_emails or [])
