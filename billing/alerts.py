"""Recording budget thresholds as spend crosses them (delivery is the workers' job)."""

from __future__ import annotations

from dataclasses import dataclass

from billing.models import BudgetAlert


@dataclass(frozen=True)
class Crossing:
    scope: str
    owner_id: int
    team_id: int
    period_id: str
    threshold_percent: int
    limit_micro_usd: int
    spent_micro_usd: int


def crossings(
    *,
    scope: str,
    owner_id: int,
    team_id: int,
    period_id: str,
    limit: int,
    before: int,
    after: int,
    thresholds: list[int],
) -> list[Crossing]:
    """Thresholds that `before → after` passed: each crossed by exactly one settle."""
    if limit <= 0:
        return []
    return [
        Crossing(scope, owner_id, team_id, period_id, t, limit, after)
        for t in thresholds
        # spent * 100 >= limit * t, in integers: no float rounding at the boundary.
        if before * 100 < limit * t <= after * 100
    ]


def alerts_record(found: list[Crossing]) -> None:
    # The unique constraint makes a threshold fire once per period, whoever races.
    BudgetAlert.objects.bulk_create(
        [
            BudgetAlert(
                scope=c.scope,
                owner_id=c.owner_id,
                team_id=c.team_id,
                period_id=c.period_id,
                threshold_percent=c.threshold_percent,
                limit_micro_usd=c.limit_micro_usd,
                spent_micro_usd=c.spent_micro_usd,
            )
            for c in found
        ],
        ignore_conflicts=True,
    )
