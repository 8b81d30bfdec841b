"""Reads of the ledger: spend this period (per model), filtered pages of rows, and the
reconciliation of the ledger with the providers' bills."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal

from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing.models import LedgerEntry, ProviderCost
from billing.periods import Period, current_period
from billing.pricing import MICRO
from billing.usage import usage_report


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


def period_spends(
    dimension: Literal["team_id", "key_id"],
    owners: Iterable[tuple[int, str, str, datetime]],
    now: datetime | None = None,
) -> dict[int, int]:
    """`period_spend` for many teams (or keys) at once, each over its own current period.

    For list pages. `owners` are (id, budget period, timezone, created at). Read from
    the rollups and the live tail (billing.usage), one call per distinct period: owners
    sharing a period and timezone share the call. Equal to `period_spend` per owner.
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
        rows = usage_report(
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


# --- reconciliation with the providers' bills -----------------------------------------------------

# Money in the report: whole micro-dollars for drift, hundredths for percentages.
_MICRO_USD = Decimal("0.000001")
_HUNDREDTH = Decimal("0.01")


@dataclass(frozen=True)
class ProviderReconciliationRow:
    """One provider, model and UTC day: our list cost against the provider's bill."""

    provider: str
    model: str
    day: date
    ledger_requests: int
    ledger_cost_micro_usd: int
    # None: only a usage export covered the day, so there is no bill to compare with.
    provider_cost_usd: Decimal | None
    provider_input_tokens: int | None
    provider_output_tokens: int | None
    ledger_input_tokens: int
    ledger_output_tokens: int

    @property
    def ledger_cost_usd(self) -> Decimal:
        return Decimal(self.ledger_cost_micro_usd) / MICRO

    @property
    def drift_usd(self) -> Decimal | None:
        """What the provider billed beyond our list cost (negative: less), to the micro-dollar."""
        if self.provider_cost_usd is None:
            return None
        return (self.provider_cost_usd - self.ledger_cost_usd).quantize(_MICRO_USD)

    @property
    def drift_percent(self) -> Decimal | None:
        """The drift as a share of the bill; ±100 when one side has nothing at all."""
        if self.provider_cost_usd is None:
            return None
        base = self.provider_cost_usd or self.ledger_cost_usd
        if not base:
            return Decimal("0.00")
        diff = self.provider_cost_usd - self.ledger_cost_usd
        return (diff * 100 / base).quantize(_HUNDREDTH)

    def drifts(self, threshold_percent: Decimal) -> bool:
        percent = self.drift_percent
        return percent is not None and abs(percent) > threshold_percent


def upstream_model(provider: str, provider_model: str) -> str:
    """'gpt-4o-mini' for ('openai', 'openai/gpt-4o-mini'): the name on the provider's bill."""
    prefix = f"{provider}/"
    return provider_model[len(prefix) :] if provider_model.startswith(prefix) else provider_model


def provider_reconciliation(
    *, provider: str | None = None, since: date | None = None, until: date | None = None
) -> list[ProviderReconciliationRow]:
    """Per provider, model and UTC day: the ledger's list cost against the imported bill.

    Only days the provider's imports cover are reported (a day not imported yet is not
    a drift). Models are matched by the provider's own name for them: the ledger's
    provider model without its "provider/" prefix. A model on one side only shows up
    with nothing on the other (drift ±100%). `until` is exclusive.
    """
    costs = ProviderCost.objects.all()
    if provider:
        costs = costs.filter(provider=provider)
    if since is not None:
        costs = costs.filter(day__gte=since)
    if until is not None:
        costs = costs.filter(day__lt=until)
    billed = {(c.provider, c.model, c.day): c for c in costs}
    covered = {(p, d) for p, _, d in billed}
    # Days a costs export (not only a usage export) stated: a model missing there cost 0.
    costed = {(p, d) for (p, _, d), c in billed.items() if c.cost_usd is not None}
    if not covered:
        return []
    first = min(d for _, d in covered)
    last = max(d for _, d in covered)
    ledger = (
        LedgerEntry.objects.filter(
            provider__in={p for p, _ in covered},
            started_at__gte=datetime.combine(first, time.min, UTC),
            started_at__lt=datetime.combine(last + timedelta(days=1), time.min, UTC),
        )
        .annotate(day=TruncDate("started_at", tzinfo=UTC))
        .values("provider", "provider_model", "day")
        .annotate(
            requests=Count("id"),
            cost=Sum("list_cost_micro_usd"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
        )
    )
    ours: dict[tuple[str, str, date], list[int]] = {}
    for row in ledger:
        if (row["provider"], row["day"]) not in covered:
            continue
        key = (row["provider"], upstream_model(row["provider"], row["provider_model"]), row["day"])
        sums = ours.setdefault(key, [0, 0, 0, 0])
        sums[0] += int(row["requests"] or 0)
        sums[1] += int(row["cost"] or 0)
        sums[2] += int(row["prompt"] or 0)
        sums[3] += int(row["completion"] or 0)
    out = []
    for key in sorted(billed.keys() | ours.keys(), key=lambda k: (k[2], k[0], k[1])):
        bill = billed.get(key)
        requests, cost, prompt, completion = ours.get(key, [0, 0, 0, 0])
        out.append(
            ProviderReconciliationRow(
                provider=key[0],
                model=key[1],
                day=key[2],
                ledger_requests=requests,
                ledger_cost_micro_usd=cost,
                # No bill row for a model we used on a covered day: the provider billed 0,
                # unless that day's import was a usage export only (then unknown).
                provider_cost_usd=(
                    bill.cost_usd
                    if bill is not None
                    else (Decimal(0) if (key[0], key[2]) in costed else None)
                ),
                provider_input_tokens=bill.input_tokens if bill else None,
                provider_output_tokens=bill.output_tokens if bill else None,
                ledger_input_tokens=prompt,
                ledger_output_tokens=completion,
            )
        )
    return out


def provider_bill_providers() -> list[str]:
    """The providers whose bills have been imported."""
    return list(
        ProviderCost.objects.order_by("provider").values_list("provider", flat=True).distinct()
    )


def provider_bill_last_day() -> date | None:
    """The latest UTC day any provider's bill was imported for."""
    return ProviderCost.objects.order_by("-day").values_list("day", flat=True).first()
