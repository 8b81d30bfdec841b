"""Unified invoices: one per team and calendar month (in the team's timezone).

Which ledger rows an invoice covers
    Invoice P covers the team's rows with `started_at < P.period_end` and
    `created_at < P.ledger_cutoff`, minus those the previous finalized invoice Q
    covered (`started_at < Q.period_end` and `created_at < Q.ledger_cutoff`).
    Invoices are finalized in month order and only the latest finalized one can be
    voided, so these regions never overlap and leave nothing out: a row of March that
    arrives after March was finalized lands on April's invoice as an adjustment line,
    and if April is voided its rows go onto the next invoice finalized after it.
    The cutoff trails "now" by GATEWAY_INVOICE_CUTOFF_LAG_SECONDS, so a ledger write
    still committing when the invoice is computed is not skipped.

The total
    Every line's amount is the sum of its rows' charged costs, and the total is the
    sum of the lines: the total equals the ledger's charged sum over the covered rows
    to the micro-dollar. Unit prices on lines are informational (the configured prices
    when the invoice was computed).

States
    draft (recomputed on demand and at finalization) → finalized (numbered
    INV-YYYY-NNNNNN from a locked counter, so numbers have no gaps; immutable) → void.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import TruncMonth
from django.template.loader import render_to_string
from django.utils import timezone

from accounts.models import Team
from billing.csv_export import csv_amount, safe_writer
from billing.models import (
    Invoice,
    InvoiceLine,
    InvoiceLineKind,
    InvoiceNumberSequence,
    InvoiceStatus,
    LedgerEntry,
)
from billing.periods import current_period, zone
from billing.pricing import Prices, micro_usd_to_str
from core.audit import audit
from core.audit import snapshot as audit_snapshot
from core.errors import GatewayError

logger = logging.getLogger(__name__)

_SUMS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "list_cost_micro_usd",
    "charged_cost_micro_usd",
)


def _conflict(message: str) -> GatewayError:
    return GatewayError(message, 409, "invalid_request_error", "invoice_conflict")


def _not_found(invoice_id: int) -> GatewayError:
    return GatewayError(f"No invoice with id {invoice_id}.", 404, code="not_found")


# --- periods ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Month:
    year: int
    month: int
    start: datetime  # UTC
    end: datetime  # UTC, exclusive

    @property
    def label(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def month_of(tz_name: str, year: int, month: int) -> Month:
    tz = zone(tz_name)
    middle = datetime(year, month, 15, 12, tzinfo=tz)
    period = current_period("monthly", tz_name, middle.astimezone(UTC))
    assert period.start is not None and period.end is not None
    return Month(year, month, period.start, period.end)


def month_containing(tz_name: str, moment: datetime) -> Month:
    local = moment.astimezone(zone(tz_name))
    return month_of(tz_name, local.year, local.month)


def _previous_month(month: Month, tz_name: str) -> Month:
    year, number = (month.year - 1, 12) if month.month == 1 else (month.year, month.month - 1)
    return month_of(tz_name, year, number)


# --- which rows, and the lines ----------------------------------------------------------------


def _previous_finalized(invoice: Invoice) -> Invoice | None:
    return (
        Invoice.objects.filter(
            team_id=invoice.team_id,
            status=InvoiceStatus.FINALIZED,
            period_start__lt=invoice.period_start,
        )
        .exclude(pk=invoice.pk)
        .order_by("-period_start")
        .first()
    )


def invoice_rows(invoice: Invoice) -> QuerySet[LedgerEntry]:
    """The ledger rows an invoice covers (for a draft: as of its last computation)."""
    rows = LedgerEntry.objects.filter(
        team_id=invoice.team_id,
        started_at__lt=invoice.period_end,
        created_at__lt=invoice.ledger_cutoff,
    )
    if invoice.previous_cutoff is not None and invoice.previous_period_end is not None:
        rows = rows.exclude(
            started_at__lt=invoice.previous_period_end,
            created_at__lt=invoice.previous_cutoff,
        )
    return rows


# What each (provider, public model) costs per 1M tokens now. The data plane, a layer
# above, owns the configured deployments and registers this at start-up
# (gateway.apps); until then (a bare billing shell) invoices list no unit prices.
UnitPriceSource = Callable[[], Iterable[tuple[str, str, Prices]]]
_unit_price_source: UnitPriceSource = tuple


def register_unit_price_source(source: UnitPriceSource) -> None:
    global _unit_price_source
    _unit_price_source = source


def _unit_prices() -> dict[tuple[str, str], dict[str, str]]:
    """USD per 1M tokens of each kind for each (provider, public model) configured now."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for provider, name, prices in _unit_price_source():
        out.setdefault(
            (provider, name),
            {
                "input": _price(prices.input),
                "output": _price(prices.output),
                "cached_input": _price(prices.cached_input),
                "cache_write": _price(prices.cache_write),
                "reasoning": _price(prices.reasoning),
            },
        )
    return out


def _price(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _build_lines(invoice: Invoice, rows: QuerySet[LedgerEntry]) -> list[InvoiceLine]:
    tz = zone(invoice.timezone)
    sums = {name: Sum(name) for name in _SUMS}
    usage = (
        rows.filter(started_at__gte=invoice.period_start)
        .order_by()
        .values("provider", "model", "is_batch")
        .annotate(requests=Count("id"), **sums)
    )
    adjustments = (
        rows.filter(started_at__lt=invoice.period_start)
        .annotate(month=TruncMonth("started_at", tzinfo=tz))
        .order_by()
        .values("month", "provider", "model", "is_batch")
        .annotate(requests=Count("id"), **sums)
    )
    groups: list[tuple[str, str, dict[str, Any]]] = [
        (InvoiceLineKind.USAGE, "", dict(g)) for g in usage
    ]
    groups += [
        (InvoiceLineKind.ADJUSTMENT, g["month"].astimezone(tz).strftime("%Y-%m"), dict(g))
        for g in adjustments
    ]
    groups.sort(
        key=lambda g: (
            g[0] != InvoiceLineKind.USAGE,
            g[1],
            g[2]["provider"],
            g[2]["model"],
            g[2]["is_batch"],
        )
    )
    prices = _unit_prices() if groups else {}
    lines = []
    for position, (kind, usage_period, group) in enumerate(groups, start=1):
        provider, model = group["provider"] or "", group["model"]
        what = f"{provider} {model}".strip() + (" (batch)" if group["is_batch"] else "")
        description = (
            f"{what}: usage {invoice.period_label}"
            if kind == InvoiceLineKind.USAGE
            else f"{what}: late usage of {usage_period}"
        )
        lines.append(
            InvoiceLine(
                invoice=invoice,
                position=position,
                kind=kind,
                usage_period=usage_period or invoice.period_label,
                provider=provider,
                model=model,
                is_batch=group["is_batch"],
                description=description[:500],
                requests=group["requests"],
                prompt_tokens=int(group["prompt_tokens"] or 0),
                completion_tokens=int(group["completion_tokens"] or 0),
                cached_read_tokens=int(group["cached_read_tokens"] or 0),
                cache_write_tokens=int(group["cache_write_tokens"] or 0),
                reasoning_tokens=int(group["reasoning_tokens"] or 0),
                unit_prices=prices.get((provider, model), {}),
                list_amount_micro_usd=int(group["list_cost_micro_usd"] or 0),
                amount_micro_usd=int(group["charged_cost_micro_usd"] or 0),
            )
        )
    return lines


def _compute(invoice: Invoice, team: Team | None, now: datetime) -> None:
    """(Re)compute a draft's coverage, lines and totals. Caller holds the invoice's lock."""
    previous = _previous_finalized(invoice)
    invoice.previous_cutoff = previous.ledger_cutoff if previous else None
    invoice.previous_period_end = previous.period_end if previous else None
    cutoff = now - timedelta(seconds=settings.GATEWAY_INVOICE_CUTOFF_LAG_SECONDS)
    if previous is not None and cutoff < previous.ledger_cutoff:
        cutoff = previous.ledger_cutoff  # never cover less than nothing
    invoice.ledger_cutoff = cutoff
    invoice.computed_at = now
    if team is not None:
        invoice.team_name = team.name
        invoice.markup_percent = team.markup_percent
    rows = invoice_rows(invoice)
    lines = _build_lines(invoice, rows)
    invoice.subtotal_micro_usd = sum(line.list_amount_micro_usd for line in lines)
    invoice.total_micro_usd = sum(line.amount_micro_usd for line in lines)
    invoice.markup_micro_usd = invoice.total_micro_usd - invoice.subtotal_micro_usd
    invoice.ledger_rows = sum(line.requests for line in lines)
    if invoice.pk is None:
        invoice.save()
    else:
        invoice.save(
            update_fields=[
                "previous_cutoff",
                "previous_period_end",
                "ledger_cutoff",
                "computed_at",
                "team_name",
                "markup_percent",
                "subtotal_micro_usd",
                "total_micro_usd",
                "markup_micro_usd",
                "ledger_rows",
            ]
        )
    InvoiceLine.objects.filter(invoice=invoice).delete()
    InvoiceLine.objects.bulk_create(lines)


# --- services -----------------------------------------------------------------------------------


# Recomputing a draft always moves these; alone, they are not a change worth auditing
# (the hourly drafting task would otherwise log every open draft every hour).
_RECOMPUTE_BOOKKEEPING = ("computed_at", "ledger_cutoff")


def _changed(before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
    def strip(data: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (data or {}).items() if k not in _RECOMPUTE_BOOKKEEPING}

    return strip(before) != strip(after)


def invoice_draft(
    *, team_id: int, year: int, month: int, now: datetime | None = None, actor: str = "system"
) -> Invoice:
    """Draft (or refresh the draft of) a team's invoice for a closed month. Idempotent.

    A finalized invoice for the month is returned unchanged. A new draft is audited as
    "create"; a refresh as "update", only when it changed more than the bookkeeping.
    """
    now = now or timezone.now()
    team = Team.objects.filter(id=team_id).first()
    if team is None:
        raise GatewayError(f"No team with id {team_id}.", 404, code="not_found")
    if not 1 <= month <= 12:
        raise GatewayError("month must be 1 to 12.", 400, code="invalid_parameter", param="month")
    period = month_of(team.timezone, year, month)
    if period.end > now:
        raise _conflict(
            f"{period.label} has not ended yet in {team.timezone} (it ends at "
            f"{period.end.isoformat()}); invoices are drafted for closed months."
        )
    for _ in range(2):
        try:
            with transaction.atomic():
                invoice = (
                    Invoice.objects.select_for_update()
                    .filter(team_id=team_id, period_start=period.start)
                    .exclude(status=InvoiceStatus.VOID)
                    .first()
                )
                if invoice is not None and invoice.status != InvoiceStatus.DRAFT:
                    return invoice
                before = audit_snapshot(invoice)
                if invoice is None:
                    invoice = Invoice(
                        team_id=team_id,
                        period_label=period.label,
                        period_start=period.start,
                        period_end=period.end,
                        timezone=team.timezone,
                        ledger_cutoff=now,
                        computed_at=now,
                    )
                _compute(invoice, team, now)
                if before is None:
                    audit(actor=actor, action="create", obj=invoice, before=None, team_id=team_id)
                elif _changed(before, audit_snapshot(invoice)):
                    audit(actor=actor, action="update", obj=invoice, before=before, team_id=team_id)
                return invoice
        except IntegrityError:
            # Another worker drafted the same month at the same moment: use theirs.
            continue
    raise _conflict(f"Could not draft {period.label} for team {team_id}; retry.")


def _next_number(year: int) -> str:
    InvoiceNumberSequence.objects.get_or_create(year=year)
    # The row lock serialises finalizations; a rollback gives the number back.
    sequence = InvoiceNumberSequence.objects.select_for_update().get(year=year)
    sequence.last_number += 1
    sequence.save(update_fields=["last_number"])
    return f"{settings.GATEWAY_INVOICE_PREFIX}-{year}-{sequence.last_number:06d}"


def invoice_finalize(
    *, invoice_id: int, now: datetime | None = None, actor: str = "system"
) -> Invoice:
    """Recompute a draft one last time, number it and freeze it. Idempotent.

    Audited as "finalize", before being the draft as last computed.
    """
    from billing import webhooks

    now = now or timezone.now()
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().filter(id=invoice_id).first()
        if invoice is None:
            raise _not_found(invoice_id)
        if invoice.status == InvoiceStatus.FINALIZED:
            return invoice
        if invoice.status == InvoiceStatus.VOID:
            raise _conflict(f"Invoice {invoice.number or invoice.id} is void.")
        # One finalization per team at a time: each one depends on the one before.
        list(
            Invoice.objects.select_for_update()
            .filter(team_id=invoice.team_id)
            .order_by("id")
            .values_list("id", flat=True)
        )
        later = Invoice.objects.filter(
            team_id=invoice.team_id,
            status=InvoiceStatus.FINALIZED,
            period_start__gt=invoice.period_start,
        ).first()
        if later is not None:
            raise _conflict(
                f"{later.number} ({later.period_label}) is already finalized; invoices are "
                f"finalized in month order. Void {later.number} first to finalize "
                f"{invoice.period_label}."
            )
        earlier = Invoice.objects.filter(
            team_id=invoice.team_id,
            status=InvoiceStatus.DRAFT,
            period_start__lt=invoice.period_start,
        ).first()
        if earlier is not None:
            raise _conflict(
                f"The draft for {earlier.period_label} (id {earlier.id}) must be finalized "
                f"before {invoice.period_label}."
            )
        team = Team.objects.filter(id=invoice.team_id).first()
        before = audit_snapshot(invoice)
        _compute(invoice, team, now)
        invoice.number = _next_number(now.astimezone(UTC).year)
        invoice.status = InvoiceStatus.FINALIZED
        invoice.finalized_at = now
        invoice.save(update_fields=["number", "status", "finalized_at"])
        audit(actor=actor, action="finalize", obj=invoice, before=before, team_id=invoice.team_id)
        webhooks.event_emit(
            team_id=invoice.team_id,
            event_type="invoice.finalized",
            idempotency_key=f"invoice.finalized:{invoice.id}",
            data=invoice_summary(invoice),
        )
    return invoice


def invoice_void(
    *, invoice_id: int, reason: str = "", now: datetime | None = None, actor: str = "system"
) -> Invoice:
    """Void the team's latest finalized invoice (audited as "void"). Idempotent."""
    now = now or timezone.now()
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().filter(id=invoice_id).first()
        if invoice is None:
            raise _not_found(invoice_id)
        if invoice.status == InvoiceStatus.VOID:
            return invoice
        if invoice.status == InvoiceStatus.DRAFT:
            raise _conflict(
                "Drafts are not voided: they are recomputed until finalized. "
                "Finalize it first if it must be issued and then voided."
            )
        latest = (
            Invoice.objects.filter(team_id=invoice.team_id, status=InvoiceStatus.FINALIZED)
            .order_by("-period_start")
            .first()
        )
        if latest is not None and latest.pk != invoice.pk:
            raise _conflict(
                f"Only the team's latest finalized invoice ({latest.number}) can be voided; "
                f"void it first. Later months' invoices build on {invoice.number}."
            )
        before = audit_snapshot(invoice)
        invoice.status = InvoiceStatus.VOID
        invoice.voided_at = now
        invoice.void_reason = reason[:500]
        invoice.save(update_fields=["status", "voided_at", "void_reason"])
        audit(actor=actor, action="void", obj=invoice, before=before, team_id=invoice.team_id)
    return invoice


def invoices_draft_due(*, now: datetime | None = None) -> list[int]:
    """Draft every missing invoice of a closed month (and refresh open drafts). Idempotent.

    Looks back GATEWAY_INVOICE_BACKFILL_MONTHS months, not before the team existed.
    """
    now = now or timezone.now()
    touched = []
    for team in Team.objects.order_by("id"):
        month = _previous_month(month_containing(team.timezone, now), team.timezone)
        created = month_containing(team.timezone, team.created_at)
        months: list[Month] = []
        while len(months) < settings.GATEWAY_INVOICE_BACKFILL_MONTHS and month.end > created.start:
            months.append(month)
            month = _previous_month(month, team.timezone)
        live = dict(
            Invoice.objects.filter(team_id=team.id, period_start__in=[m.start for m in months])
            .exclude(status=InvoiceStatus.VOID)
            .values_list("period_start", "status")
        )
        for month in reversed(months):
            if live.get(month.start) in (None, InvoiceStatus.DRAFT):
                invoice = invoice_draft(
                    team_id=team.id, year=month.year, month=month.month, now=now, actor="system"
                )
                touched.append(invoice.id)
    return touched


# --- reads and exports ---------------------------------------------------------------------------


def invoice_list(
    *, team_id: int | None = None, status: str | None = None, period: str | None = None
) -> QuerySet[Invoice]:
    rows = Invoice.objects.all()
    if team_id is not None:
        rows = rows.filter(team_id=team_id)
    if status:
        rows = rows.filter(status=status)
    if period:
        rows = rows.filter(period_label=period)
    return rows.order_by("-period_start", "-id")


def invoice_get(*, invoice_id: int) -> Invoice:
    invoice = Invoice.objects.filter(id=invoice_id).prefetch_related("lines").first()
    if invoice is None:
        raise _not_found(invoice_id)
    return invoice


def invoice_summary(invoice: Invoice) -> dict[str, Any]:
    return {
        "id": invoice.id,
        "number": invoice.number,
        "status": invoice.status,
        "team_id": invoice.team_id,
        "team_name": invoice.team_name,
        "period": invoice.period_label,
        "period_start": invoice.period_start.isoformat(),
        "period_end": invoice.period_end.isoformat(),
        "currency": invoice.currency,
        "subtotal_usd": micro_usd_to_str(invoice.subtotal_micro_usd),
        "markup_usd": micro_usd_to_str(invoice.markup_micro_usd),
        "total_usd": micro_usd_to_str(invoice.total_micro_usd),
        "finalized_at": invoice.finalized_at.isoformat() if invoice.finalized_at else None,
    }


CSV_COLUMNS = [
    "invoice_number",
    "period",
    "position",
    "kind",
    "usage_period",
    "provider",
    "model",
    "batch",
    "description",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "unit_price_input_per_1m",
    "unit_price_output_per_1m",
    "list_amount_usd",
    "amount_usd",
]


def invoice_csv(invoice: Invoice) -> str:
    buffer = io.StringIO()
    writer = safe_writer(buffer)  # model names and descriptions are formula-proofed
    writer.writerow(CSV_COLUMNS)
    number = invoice.number or f"DRAFT-{invoice.id}"
    for line in invoice.lines.all():
        writer.writerow(
            [
                number,
                invoice.period_label,
                line.position,
                line.kind,
                line.usage_period,
                line.provider,
                line.model,
                "yes" if line.is_batch else "no",
                line.description,
                line.requests,
                line.prompt_tokens,
                line.completion_tokens,
                line.cached_read_tokens,
                line.cache_write_tokens,
                line.reasoning_tokens,
                line.unit_prices.get("input", ""),
                line.unit_prices.get("output", ""),
                csv_amount(line.list_amount_micro_usd),
                csv_amount(line.amount_micro_usd),
            ]
        )
    # Totals as rows of their own: the `kind` names them, `amount_usd` holds them.
    for kind, value in (
        ("subtotal", invoice.subtotal_micro_usd),
        ("markup" if invoice.markup_micro_usd >= 0 else "discount", invoice.markup_micro_usd),
        ("total", invoice.total_micro_usd),
    ):
        row: dict[str, object] = dict.fromkeys(CSV_COLUMNS, "")
        row.update(
            invoice_number=number,
            period=invoice.period_label,
            kind=kind,
            amount_usd=csv_amount(value),
        )
        writer.writerow([row[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def invoice_html(invoice: Invoice) -> str:
    lines = list(invoice.lines.all())
    by_kind: dict[str, list[InvoiceLine]] = defaultdict(list)
    for line in lines:
        by_kind[line.kind].append(line)
    return render_to_string(
        "billing/invoice.html",
        {
            "invoice": invoice,
            "usage_lines": by_kind[InvoiceLineKind.USAGE],
            "adjustment_lines": by_kind[InvoiceLineKind.ADJUSTMENT],
            "usd": micro_usd_to_str,
            "subtotal": micro_usd_to_str(invoice.subtotal_micro_usd),
            "markup": micro_usd_to_str(invoice.markup_micro_usd),
            "total": micro_usd_to_str(invoice.total_micro_usd),
            "is_discount": invoice.markup_micro_usd < 0,
            "generated_at": timezone.now(),
        },
    )


def ledger_charged_sum(invoice: Invoice) -> int:
    """The ledger's charged sum over the rows the invoice covers (the invariant's other side)."""
    return int(invoice_rows(invoice).aggregate(total=Sum("charged_cost_micro_usd"))["total"] or 0)
