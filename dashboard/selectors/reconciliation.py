"""The reconciliation page: our list cost against the providers' bills, for one month."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from django.conf import settings

from billing.selectors import (
    ProviderReconciliationRow,
    provider_bill_last_day,
    provider_bill_providers,
    provider_reconciliation,
)

MICRO = Decimal(1_000_000)


@dataclass(frozen=True)
class ReconciliationLine:
    row: ProviderReconciliationRow
    flagged: bool

    # The page's money filters take micro-USD; a provider's bill may be finer than that.
    @property
    def provider_cost_micro(self) -> Decimal | None:
        cost = self.row.provider_cost_usd
        return None if cost is None else cost * MICRO

    @property
    def drift_micro(self) -> Decimal | None:
        drift = self.row.drift_usd
        return None if drift is None else drift * MICRO


@dataclass(frozen=True)
class ReconciliationReport:
    month: str
    provider: str
    threshold_percent: Decimal
    lines: list[ReconciliationLine]

    @property
    def flagged(self) -> int:
        return sum(line.flagged for line in self.lines)

    @property
    def ledger_micro(self) -> int:
        return sum(line.row.ledger_cost_micro_usd for line in self.lines)

    @property
    def provider_micro(self) -> Decimal:
        return sum((line.provider_cost_micro or Decimal(0) for line in self.lines), Decimal(0))


def month_bounds(month: str) -> tuple[date, date]:
    year, number = (int(part) for part in month.split("-"))
    first = date(year, number, 1)
    return first, date(year + number // 12, number % 12 + 1, 1)


def latest_month() -> str | None:
    """The month of the latest day any provider's bill was imported for."""
    last = provider_bill_last_day()
    return None if last is None else f"{last:%Y-%m}"


def providers() -> list[str]:
    return provider_bill_providers()


def reconciliation_report(*, month: str, provider: str = "") -> ReconciliationReport:
    since, until = month_bounds(month)
    threshold: Decimal = settings.GATEWAY_RECONCILIATION_DRIFT_PERCENT
    rows = provider_reconciliation(provider=provider or None, since=since, until=until)
    lines = [ReconciliationLine(row, row.drifts(threshold)) for row in rows]
    return ReconciliationReport(month, provider, threshold, lines)
