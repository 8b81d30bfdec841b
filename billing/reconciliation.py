"""Reconciliation with the providers' bills: importing their exports, recording drift.

The report itself is a read (billing.selectors.provider_reconciliation); here are the
writes: an export's figures stored per provider, model and day, and a DriftAlert for
each model and day whose drift is above GATEWAY_RECONCILIATION_DRIFT_PERCENT.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

from django.conf import settings
from django.db import transaction

from billing.models import DriftAlert, ProviderCost, ProviderCostImport
from billing.provider_exports import ExportError, iter_rows, parse_export
from billing.selectors import provider_reconciliation

# ProviderCost.cost_usd keeps 12 places: below that (a pico-dollar) is rounding noise.
_STORED = Decimal("1e-12")


@dataclass(frozen=True)
class ImportOutcome:
    provider: str
    kind: str
    first_day: date | None
    last_day: date | None
    rows: int
    created: int
    updated: int
    already_imported: bool
    drift_alerts: int


def provider_costs_import(
    *, provider: str, content: bytes, filename: str = "", period: str = ""
) -> ImportOutcome:
    """Store one export's figures; all or nothing, and the same file twice changes nothing.

    Raises ExportError (naming the place in the file) before anything is written.
    """
    parsed = parse_export(provider, content, period=period)  # may raise: nothing written yet
    digest = hashlib.sha256(content).hexdigest()
    days = parsed.days
    with transaction.atomic():
        source, fresh = ProviderCostImport.objects.get_or_create(
            provider=provider,
            sha256=digest,
            defaults={
                "kind": parsed.kind,
                "filename": filename[:500],
                "period": period,
                "first_day": days[0],
                "last_day": days[-1],
                "rows": len(parsed.figures),
            },
        )
        if not fresh:
            return ImportOutcome(
                provider, parsed.kind, days[0], days[-1], len(parsed.figures), 0, 0, True, 0
            )
        # Locked, so two imports of overlapping files apply one after the other.
        existing = {
            (c.model, c.day): c
            for c in ProviderCost.objects.select_for_update().filter(
                provider=provider, day__in=days
            )
        }
        created = updated = 0
        for model, day, figures in iter_rows(parsed):
            row = existing.get((model, day))
            if row is None:
                row = ProviderCost(provider=provider, model=model, day=day, source=source)
                created += 1
            else:
                updated += 1
            if parsed.kind == "costs":
                assert figures.cost_usd is not None
                row.cost_usd = figures.cost_usd.quantize(_STORED, rounding=ROUND_HALF_EVEN)
            else:
                row.input_tokens = figures.input_tokens
                row.output_tokens = figures.output_tokens
            row.source = source
            row.save()
        if parsed.kind == "costs":
            # A model billed on an earlier import of the same day but absent now was
            # dropped from the bill: the newer export is the day's whole statement.
            stale = [
                c.id
                for (model, day), c in existing.items()
                if (model, day) not in parsed.figures and c.cost_usd is not None
            ]
            ProviderCost.objects.filter(id__in=stale).update(cost_usd=Decimal(0), source=source)
        alerts = drift_alerts_record(provider=provider, since=days[0], until=days[-1])
    return ImportOutcome(
        provider,
        parsed.kind,
        days[0],
        days[-1],
        len(parsed.figures),
        created,
        updated,
        False,
        alerts,
    )


def drift_alerts_record(*, provider: str | None, since: date, until: date) -> int:
    """Record a DriftAlert for each model and day over the threshold; returns how many are new.

    `until` is inclusive. The unique constraint makes each provider/model/day alert once,
    however often the reconciliation runs or who races.
    """
    threshold: Decimal = settings.GATEWAY_RECONCILIATION_DRIFT_PERCENT
    rows = provider_reconciliation(provider=provider, since=since, until=until + timedelta(days=1))
    found = [
        DriftAlert(
            provider=r.provider,
            model=r.model,
            day=r.day,
            ledger_cost_micro_usd=r.ledger_cost_micro_usd,
            provider_cost_usd=r.provider_cost_usd,
            drift_percent=r.drift_percent,
            threshold_percent=threshold,
        )
        for r in rows
        # drifts() is only true with a bill, so neither figure is None here.
        if r.drifts(threshold) and r.provider_cost_usd is not None and r.drift_percent is not None
    ]
    if not found:
        return 0
    # Counted around the insert, for the command's summary only (ignore_conflicts hides which).
    before = DriftAlert.objects.filter(day__gte=since, day__lte=until).count()
    DriftAlert.objects.bulk_create(found, ignore_conflicts=True)
    after = DriftAlert.objects.filter(day__gte=since, day__lte=until).count()
    return after - before


__all__ = ["ExportError", "ImportOutcome", "drift_alerts_record", "provider_costs_import"]
