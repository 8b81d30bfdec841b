"""What several dashboard pages read: paging and the teams a viewer sees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.paginator import Page, Paginator
from django.db.models import QuerySet

from accounts.models import Team
from dashboard.access import Viewer

PAGE_SIZE = 25


def paginate(
    rows: Sequence[Any] | QuerySet[Any], page: str | int | None, size: int = PAGE_SIZE
) -> Page[Any]:
    return Paginator(rows, size).get_page(page)


def visible_teams(viewer: Viewer) -> QuerySet[Team]:
    teams = Team.objects.all()
    ids = viewer.visible_team_ids()
    return teams if ids is None else teams.filter(id__in=ids)
