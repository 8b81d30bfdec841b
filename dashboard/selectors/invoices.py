"""The invoices pages: invoices the viewer may read, and an invoice's lines."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import QuerySet

from billing import invoices
from billing.models import Invoice, InvoiceLine, InvoiceLineKind, InvoiceStatus
from dashboard.access import Viewer

# What a team admin may read: invoices that were issued to the team (drafts are finance's).
ISSUED_STATUSES = (InvoiceStatus.FINALIZED, InvoiceStatus.VOID)


@dataclass(frozen=True)
class InvoiceQuery:
    team_id: int | None = None
    status: str = ""
    period: str = ""  # "2026-03"


def invoices_for(viewer: Viewer, query: InvoiceQuery) -> QuerySet[Invoice]:
    """billing.invoices.invoice_list, narrowed to what the viewer may read."""
    rows = invoices.invoice_list(
        team_id=query.team_id, status=query.status or None, period=query.period or None
    )
    if not viewer.can_manage_invoices:
        rows = rows.filter(team_id__in=viewer.admin_team_ids, status__in=ISSUED_STATUSES)
    return rows


# Token kinds as (line field, unit price key, label).
_TOKEN_KINDS = (
    ("prompt_tokens", "input", "Input"),
    ("completion_tokens", "output", "Output"),
    ("cached_read_tokens", "cached_input", "Cached input"),
    ("cache_write_tokens", "cache_write", "Cache write"),
    ("reasoning_tokens", "reasoning", "Reasoning"),
)


@dataclass(frozen=True)
class Quantity:
    label: str
    tokens: int
    unit_price: str  # USD per 1M tokens, as configured when the invoice was computed ("" unknown)


@dataclass(frozen=True)
class InvoiceLineRow:
    line: InvoiceLine

    @property
    def markup_micro_usd(self) -> int:
        """What the team's markup (negative: discount) adds to the list amount."""
        return self.line.amount_micro_usd - self.line.list_amount_micro_usd

    @property
    def quantities(self) -> list[Quantity]:
        prices = self.line.unit_prices or {}
        out = []
        for field_name, price_key, label in _TOKEN_KINDS:
            tokens = getattr(self.line, field_name)
            # Input and output always; the other kinds where there are some.
            if tokens or field_name in ("prompt_tokens", "completion_tokens"):
                out.append(Quantity(label, tokens, str(prices.get(price_key, ""))))
        return out


@dataclass(frozen=True)
class InvoiceDetail:
    invoice: Invoice
    usage_lines: list[InvoiceLineRow]
    adjustment_lines: list[InvoiceLineRow]

    @property
    def is_discount(self) -> bool:
        return self.invoice.markup_micro_usd < 0

    @property
    def adjustments_micro_usd(self) -> int:
        return sum(row.line.amount_micro_usd for row in self.adjustment_lines)


def invoice_detail(invoice: Invoice) -> InvoiceDetail:
    """The lines of an invoice from billing.invoices.invoice_get (already fetched)."""
    lines = [InvoiceLineRow(line) for line in invoice.lines.all()]
    return InvoiceDetail(
        invoice=invoice,
        usage_lines=[r for r in lines if r.line.kind == InvoiceLineKind.USAGE],
        adjustment_lines=[r for r in lines if r.line.kind == InvoiceLineKind.ADJUSTMENT],
    )
