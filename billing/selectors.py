"""Reads of the ledger: spend this period (in total and per model), and filtered pages of rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, QuerySet, Sum

from billing.models import LedgerEntry
from billing.periods import Period


@dataclass(frozen=True)
class LedgerFilter:
    team_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    tag: str | None = None  # rows carrying this tag among theirs


def ledger_rows(filters: LedgerFilter) -> QuerySet[LedgerEntry]:
    rows = LedgerEntry.objects.all()
    if filters.team_id is not None:
        rows = rows.filter(team_id=filters.team_id)
    if filters.key_id is not None:
        rows = rows.filter(key_id=filters.key_id)
    if filters.model:
        rows = rows.filter(model=filters.model)
    if filters.status:
        rows = rows.filter(status=filters.status)
    if filters.tag:
        rows = rows.filter(tags__contains=[filters.tag])
    if filters.since is not None:
        rows = rows.filter(started_at__gte=filters.since)
    if filters.until is not None:
        rows = rows.filter(started_at__lt=filters.until)
    return rows.order_by("-started_at", "-id")


def _period_rows(*, scope: str, owner_id: int, period: Period) -> QuerySet[LedgerEntry]:
    """The ledger rows of one team (or key) in one budget period."""
    rows = LedgerEntry.objects.filter(**{"key_id" if scope == "key" else "team_id": owner_id})
    if period.start is not None:
        rows = rows.filter(started_at__gte=period.start, started_at__lt=period.end)
    return rows


def period_spend(*, scope: str, owner_id: int, period: Period) -> int:
    """Spend this period: what a team (or key) was charged in it, in micro-USD.

    Read from the ledger, the source of truth (admission fills its counters from it).
    """
    rows = _period_rows(scope=scope, owner_id=owner_id, period=period)
    return int(rows.aggregate(total=Sum("charged_cost_micro_usd"))["total"] or 0)


def spend_by_model(*, scope: str, owner_id: int, period: Period) -> list[dict[str, Any]]:
    """`period_spend` split by model, with token counts; its rows sum to period_spend."""
    grouped = (
        _period_rows(scope=scope, owner_id=owner_id, period=period)
        .values("model")
        .annotate(
            requests=Count("id"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cached_read_tokens=Sum("cached_read_tokens"),
            cache_write_tokens=Sum("cache_write_tokens"),
            reasoning_tokens=Sum("reasoning_tokens"),
            list_cost_micro_usd=Sum("list_cost_micro_usd"),
            charged_cost_micro_usd=Sum("charged_cost_micro_usd"),
        )
        .order_by("-charged_cost_micro_usd", "model")
    )
    return [dict(row) for row in grouped]
