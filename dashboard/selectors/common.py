"""What several dashboard pages read: paging, the teams a viewer sees, and spend per
team or key over each one's own budget period.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.paginator import Page, Paginator
from django.db.models import QuerySet
from django.utils import timezone

from accounts.models import Team
from billing import usage
from billing.periods import current_period
from dashboard.access import Viewer

PAGE_SIZE = 25


def paginate(
    rows: Sequence[Any] | QuerySet[Any], page: str | int | None, size: int = PAGE_SIZE
) -> Page[Any]:
    return Paginator(rows, size).get_page(page)


def period_spend(
    dimension: str,
    owners: Iterable[tuple[int, str, str, datetime]],
    now: datetime | None = None,
) -> dict[int, int]:
    """Spend per team (or key) id in its own current budget period.

    `owners` are (id, budget period, timezone, created at). One billing.usage call per
    distinct period: owners sharing a period and timezone share the call.
    """
    now = now or timezone.now()
    windows: dict[tuple[datetime | None, datetime | None], list[int]] = defaultdict(list)
    earliest: dict[tuple[datetime | None, datetime | None], datetime] = {}
    for owner_id, kind, tz_name, created_at in owners:
        period = current_period(kind, tz_name, now)
        span = (period.start, period.end)
        windows[span].append(owner_id)
        earliest[span] = min(earliest.get(span, created_at), created_at)
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


def visible_teams(viewer: Viewer) -> QuerySet[Team]:
    teams = Team.objects.all()
    ids = viewer.visible_team_ids()
    return teams if ids is None else teams.filter(id__in=ids)
