"""Management API for money: spend, the ledger, usage rollups, invoices, webhooks, alerts."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

from django.conf import settings
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import Field, Query, Router, Schema

from accounts.models import Team, VirtualKey
from billing import admission, notifications, rollups, usage, webhooks
from billing import invoices as invoice_services
from billing.admission import Budget
from billing.csv_export import csv_amount, safe_writer
from billing.models import (
    Invoice,
    InvoiceLine,
    ReconciliationRun,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from billing.periods import current_period
from billing.pricing import micro_usd_to_str
from billing.selectors import (
    LedgerFilter,
    ledger_rows,
    provider_reconciliation,
    spend_by_model,
)
from core.api import ADMIN_ACTOR, AdminToken, ErrorOut, Page, PageParams
from core.db import run_db
from core.errors import GatewayError

router = Router(auth=AdminToken(), tags=["Billing"])


class ModelSpendOut(Schema):
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    list_cost_usd: str
    spent_usd: str


class SpendOut(Schema):
    scope: Literal["team", "key"]
    id: int
    period: str
    period_start: datetime | None
    period_end: datetime | None
    budget_usd: str | None
    spent_usd: str
    reserved_usd: str
    remaining_usd: str | None
    by_model: list[ModelSpendOut]


async def spend_report(
    *, scope: str, owner_id: int, limit: int | None, period_kind: str, tz: str
) -> SpendOut:
    period = current_period(period_kind, tz, datetime.now(UTC))
    models = await run_db(spend_by_model, scope=scope, owner_id=owner_id, period=period)
    spent = sum(int(row["charged_cost_micro_usd"] or 0) for row in models)
    reserved = 0
    if limit is not None:
        budget = Budget(scope, owner_id, limit, period_kind, period)
        snapshot = await admission.backend().snapshot(budget)
        reserved = snapshot[1] if snapshot else 0
    return SpendOut(
        scope=scope,  # type: ignore[arg-type]
        id=owner_id,
        period=period_kind,
        period_start=period.start,
        period_end=period.end,
        budget_usd=None if limit is None else micro_usd_to_str(limit),
        spent_usd=micro_usd_to_str(spent),
        reserved_usd=micro_usd_to_str(reserved),
        remaining_usd=None if limit is None else micro_usd_to_str(max(0, limit - spent - reserved)),
        by_model=[
            ModelSpendOut(
                model=row["model"],
                requests=row["requests"],
                prompt_tokens=row["prompt_tokens"] or 0,
                completion_tokens=row["completion_tokens"] or 0,
                cached_read_tokens=row["cached_read_tokens"] or 0,
                cache_write_tokens=row["cache_write_tokens"] or 0,
                reasoning_tokens=row["reasoning_tokens"] or 0,
                list_cost_usd=micro_usd_to_str(int(row["list_cost_micro_usd"] or 0)),
                spent_usd=micro_usd_to_str(int(row["charged_cost_micro_usd"] or 0)),
            )
            for row in models
        ],
    )


def _not_found(what: str, ident: int) -> GatewayError:
    return GatewayError(f"No {what} with id {ident}.", 404, code="not_found")


@router.get("/teams/{team_id}/spend", response={200: SpendOut, 401: ErrorOut, 404: ErrorOut})
async def team_spend(request: HttpRequest, team_id: int) -> SpendOut:
    team = await Team.objects.filter(id=team_id).afirst()
    if team is None:
        raise _not_found("team", team_id)
    return await spend_report(
        scope="team",
        owner_id=team.id,
        limit=team.budget_micro_usd,
        period_kind=team.budget_period,
        tz=team.timezone,
    )


@router.get("/keys/{key_id}/spend", response={200: SpendOut, 401: ErrorOut, 404: ErrorOut})
async def key_spend(request: HttpRequest, key_id: int) -> SpendOut:
    key = await VirtualKey.objects.select_related("team").filter(id=key_id).afirst()
    if key is None:
        raise _not_found("key", key_id)
    return await spend_report(
        scope="key",
        owner_id=key.id,
        limit=key.max_budget_micro_usd,
        period_kind=key.budget_period,
        tz=key.team.timezone,
    )


class LedgerQuery(Schema):
    team_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    status: Literal["success", "error", "client_disconnected", "partial"] | None = None
    since: datetime | None = None
    until: datetime | None = None
    format: Literal["json", "csv"] = "json"


class LedgerOut(Schema):
    request_id: str
    attempt: int
    kind: str
    team_id: int
    key_id: int | None
    endpoint: str
    model: str
    deployment_id: str
    provider: str
    provider_model: str
    status: str
    http_status: int | None
    prompt_tokens: int
    completion_tokens: int
    cached_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    usage_estimated: bool
    list_cost_usd: str
    charged_cost_usd: str
    cache_hit: bool
    stream: bool
    latency_ms: int
    ttft_ms: int | None
    started_at: datetime
    ended_at: datetime
    end_user: str
    tags: list[str]

    @staticmethod
    def of(row: Any) -> LedgerOut:
        return LedgerOut(
            **{name: getattr(row, name) for name in LEDGER_FIELDS},
            list_cost_usd=micro_usd_to_str(row.list_cost_micro_usd),
            charged_cost_usd=micro_usd_to_str(row.charged_cost_micro_usd),
        )


LEDGER_FIELDS = [
    name for name in LedgerOut.model_fields if name not in ("list_cost_usd", "charged_cost_usd")
]
CSV_COLUMNS = [*LEDGER_FIELDS, "list_cost_usd", "charged_cost_usd"]


def _csv(rows: Any) -> Iterator[str]:
    buffer = io.StringIO()
    writer = safe_writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in rows.iterator(chunk_size=2000):
        out = LedgerOut.of(row).model_dump()
        # Money as numbers; every text cell (end user, tags, names) is formula-proofed.
        out["list_cost_usd"] = csv_amount(row.list_cost_micro_usd)
        out["charged_cost_usd"] = csv_amount(row.charged_cost_micro_usd)
        writer.writerow(
            [
                "|".join(out[c]) if c == "tags" else ("" if out[c] is None else out[c])
                for c in CSV_COLUMNS
            ]
        )
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


@router.get(
    "/ledger",
    response={200: Page[LedgerOut], 400: ErrorOut, 401: ErrorOut},
    summary="Ledger rows, newest first; format=csv exports every matching row",
)
def ledger(request: HttpRequest, query: Query[LedgerQuery], page: Query[PageParams]) -> Any:
    rows = ledger_rows(
        LedgerFilter(
            team_id=query.team_id,
            key_id=query.key_id,
            model=query.model,
            status=query.status,
            since=query.since,
            until=query.until,
        )
    )
    if query.format == "csv":
        response = StreamingHttpResponse(_csv(rows), content_type="text/csv")
        response["content-disposition"] = 'attachment; filename="ledger.csv"'
        return response
    return page.of(rows, LedgerOut.of)


# --- invoices ------------------------------------------------------------------------------------
# Finance's view: list, open, finalize, void, and export (CSV, printable HTML). The
# dashboard calls billing.invoices' selectors and services directly.

ERRORS: dict[int, type[Schema]] = {
    400: ErrorOut,
    401: ErrorOut,
    403: ErrorOut,
    404: ErrorOut,
    409: ErrorOut,
}


class InvoiceLineOut(Schema):
    position: int
    kind: str
    usage_period: str
    provider: str
    model: str
    is_batch: bool
    description: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    unit_prices_per_million_usd: dict[str, str]
    list_amount_usd: str
    amount_usd: str

    @staticmethod
    def of(line: InvoiceLine) -> InvoiceLineOut:
        return InvoiceLineOut(
            position=line.position,
            kind=line.kind,
            usage_period=line.usage_period,
            provider=line.provider,
            model=line.model,
            is_batch=line.is_batch,
            description=line.description,
            requests=line.requests,
            prompt_tokens=line.prompt_tokens,
            completion_tokens=line.completion_tokens,
            cached_read_tokens=line.cached_read_tokens,
            cache_write_tokens=line.cache_write_tokens,
            reasoning_tokens=line.reasoning_tokens,
            unit_prices_per_million_usd=dict(line.unit_prices or {}),
            list_amount_usd=micro_usd_to_str(line.list_amount_micro_usd),
            amount_usd=micro_usd_to_str(line.amount_micro_usd),
        )


class InvoiceOut(Schema):
    id: int
    number: str | None
    status: str
    team_id: int
    team_name: str
    period: str
    period_start: datetime
    period_end: datetime
    timezone: str
    currency: str
    markup_percent: str
    subtotal_usd: str
    markup_usd: str
    total_usd: str
    ledger_rows: int
    ledger_cutoff: datetime
    computed_at: datetime
    created_at: datetime
    finalized_at: datetime | None
    voided_at: datetime | None
    void_reason: str
    lines: list[InvoiceLineOut] | None = None

    @staticmethod
    def of(invoice: Invoice, *, with_lines: bool = False) -> InvoiceOut:
        return InvoiceOut(
            id=invoice.id,
            number=invoice.number,
            status=invoice.status,
            team_id=invoice.team_id,
            team_name=invoice.team_name,
            period=invoice.period_label,
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            timezone=invoice.timezone,
            currency=invoice.currency,
            markup_percent=format(invoice.markup_percent, "f"),
            subtotal_usd=micro_usd_to_str(invoice.subtotal_micro_usd),
            markup_usd=micro_usd_to_str(invoice.markup_micro_usd),
            total_usd=micro_usd_to_str(invoice.total_micro_usd),
            ledger_rows=invoice.ledger_rows,
            ledger_cutoff=invoice.ledger_cutoff,
            computed_at=invoice.computed_at,
            created_at=invoice.created_at,
            finalized_at=invoice.finalized_at,
            voided_at=invoice.voided_at,
            void_reason=invoice.void_reason,
            lines=[InvoiceLineOut.of(line) for line in invoice.lines.all()] if with_lines else None,
        )


class InvoiceQuery(Schema):
    team_id: int | None = None
    status: Literal["draft", "finalized", "void"] | None = None
    period: str | None = Field(None, pattern=r"^\d{4}-\d{2}$")


class DraftIn(Schema):
    year: int = Field(..., ge=2000, le=2999)
    month: int = Field(..., ge=1, le=12)


class VoidIn(Schema):
    reason: str = Field("", max_length=500)


def _team_or_404(team_id: int) -> Team:
    team = Team.objects.filter(id=team_id).first()
    if team is None:
        raise _not_found("team", team_id)
    return team


@router.get("/invoices", response={200: Page[InvoiceOut], **ERRORS}, summary="List invoices")
def invoice_list(request: HttpRequest, query: Query[InvoiceQuery], page: Query[PageParams]) -> Any:
    rows = invoice_services.invoice_list(
        team_id=query.team_id, status=query.status, period=query.period
    )
    return page.of(rows, InvoiceOut.of)


@router.post(
    "/teams/{team_id}/invoices",
    response={200: InvoiceOut, **ERRORS},
    summary="Draft (or refresh the draft of) a team's invoice for a closed month",
)
def invoice_draft(request: HttpRequest, team_id: int, payload: DraftIn) -> InvoiceOut:
    _team_or_404(team_id)
    invoice = invoice_services.invoice_draft(
        team_id=team_id, year=payload.year, month=payload.month, actor=ADMIN_ACTOR
    )
    return InvoiceOut.of(invoice_services.invoice_get(invoice_id=invoice.id), with_lines=True)


@router.get("/invoices/{invoice_id}", response={200: InvoiceOut, **ERRORS})
def invoice_get(request: HttpRequest, invoice_id: int) -> InvoiceOut:
    return InvoiceOut.of(invoice_services.invoice_get(invoice_id=invoice_id), with_lines=True)


@router.post("/invoices/{invoice_id}/finalize", response={200: InvoiceOut, **ERRORS})
def invoice_finalize(request: HttpRequest, invoice_id: int) -> InvoiceOut:
    invoice_services.invoice_finalize(invoice_id=invoice_id, actor=ADMIN_ACTOR)
    return InvoiceOut.of(invoice_services.invoice_get(invoice_id=invoice_id), with_lines=True)


@router.post("/invoices/{invoice_id}/void", response={200: InvoiceOut, **ERRORS})
def invoice_void(request: HttpRequest, invoice_id: int, payload: VoidIn) -> InvoiceOut:
    invoice_services.invoice_void(invoice_id=invoice_id, reason=payload.reason, actor=ADMIN_ACTOR)
    return InvoiceOut.of(invoice_services.invoice_get(invoice_id=invoice_id), with_lines=True)


def _invoice_filename(invoice: Invoice, ext: str) -> str:
    return f"{invoice.number or f'draft-{invoice.id}'}-{invoice.period_label}.{ext}"


@router.get("/invoices/{invoice_id}/csv", response={200: None, **ERRORS}, summary="Invoice as CSV")
def invoice_csv(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = invoice_services.invoice_get(invoice_id=invoice_id)
    response = HttpResponse(invoice_services.invoice_csv(invoice), content_type="text/csv")
    response["content-disposition"] = f'attachment; filename="{_invoice_filename(invoice, "csv")}"'
    return response


@router.get(
    "/invoices/{invoice_id}/html",
    response={200: None, **ERRORS},
    summary="Invoice as a printable HTML page",
)
def invoice_html(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = invoice_services.invoice_get(invoice_id=invoice_id)
    response = HttpResponse(
        invoice_services.invoice_html(invoice), content_type="text/html; charset=utf-8"
    )
    response["content-disposition"] = f'inline; filename="{_invoice_filename(invoice, "html")}"'
    return response


# --- webhooks and alert recipients ----------------------------------------------------------------

EventType = Literal[
    "usage.threshold_reached", "budget.exceeded", "batch.completed", "invoice.finalized"
]


class WebhookIn(Schema):
    url: str = Field(..., max_length=2000)
    events: list[EventType] = Field(default_factory=list)
    description: str = Field("", max_length=500)


class WebhookPatch(Schema):
    url: str | None = Field(None, max_length=2000)
    events: list[EventType] | None = None
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = None


class WebhookOut(Schema):
    id: str
    team_id: int
    url: str
    description: str
    events: list[str]
    enabled: bool
    secret_last4: str
    created_at: datetime
    updated_at: datetime

    @staticmethod
    def of(row: WebhookEndpoint) -> WebhookOut:
        return WebhookOut(
            id=row.public_id,
            team_id=row.team_id,
            url=row.url,
            description=row.description,
            events=list(row.events or []),
            enabled=row.enabled,
            secret_last4=row.secret_last4,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class WebhookCreatedOut(WebhookOut):
    # The signing secret, shown this once: store it in the receiver.
    secret: str


class AttemptOut(Schema):
    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str


class DeliveryOut(Schema):
    id: int
    event_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str
    created_at: datetime
    delivered_at: datetime | None
    log: list[AttemptOut]

    @staticmethod
    def of(row: WebhookDelivery) -> DeliveryOut:
        return DeliveryOut(
            id=row.id,
            event_id=row.event_id,
            event_type=row.event_type,
            status=row.status,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
            log=[
                AttemptOut(
                    number=a.number,
                    started_at=a.started_at,
                    duration_ms=a.duration_ms,
                    status_code=a.status_code,
                    error=a.error,
                )
                for a in row.log.all()
            ],
        )


def _webhook(team_id: int, webhook_id: str) -> WebhookEndpoint:
    row = WebhookEndpoint.objects.filter(team_id=team_id, public_id=webhook_id).first()
    if row is None:
        raise GatewayError(
            f"No webhook endpoint {webhook_id!r} for team {team_id}.", 404, code="not_found"
        )
    return row


@router.post(
    "/teams/{team_id}/webhooks",
    response={201: WebhookCreatedOut, **ERRORS},
    summary="Add a webhook endpoint; the signing secret is shown once",
)
def webhook_create(
    request: HttpRequest, team_id: int, payload: WebhookIn
) -> tuple[int, WebhookCreatedOut]:
    _team_or_404(team_id)
    created = webhooks.endpoint_create(
        team_id=team_id,
        url=payload.url,
        events=list(payload.events),
        description=payload.description,
        actor=ADMIN_ACTOR,
    )
    out = WebhookOut.of(created.endpoint).model_dump()
    return 201, WebhookCreatedOut(**out, secret=created.secret)


@router.get("/teams/{team_id}/webhooks", response={200: list[WebhookOut], **ERRORS})
def webhook_list(request: HttpRequest, team_id: int) -> list[WebhookOut]:
    _team_or_404(team_id)
    return [WebhookOut.of(r) for r in WebhookEndpoint.objects.filter(team_id=team_id)]


@router.get("/teams/{team_id}/webhooks/{webhook_id}", response={200: WebhookOut, **ERRORS})
def webhook_get(request: HttpRequest, team_id: int, webhook_id: str) -> WebhookOut:
    return WebhookOut.of(_webhook(team_id, webhook_id))


@router.api_operation(
    ["PATCH", "PUT"], "/teams/{team_id}/webhooks/{webhook_id}", response={200: WebhookOut, **ERRORS}
)
def webhook_update(
    request: HttpRequest, team_id: int, webhook_id: str, payload: WebhookPatch
) -> WebhookOut:
    fields = payload.model_dump(exclude_unset=True)
    endpoint = _webhook(team_id, webhook_id)
    return WebhookOut.of(webhooks.endpoint_update(endpoint=endpoint, actor=ADMIN_ACTOR, **fields))


@router.delete("/teams/{team_id}/webhooks/{webhook_id}", response={204: None, **ERRORS})
def webhook_delete(request: HttpRequest, team_id: int, webhook_id: str) -> tuple[int, None]:
    webhooks.endpoint_delete(endpoint=_webhook(team_id, webhook_id), actor=ADMIN_ACTOR)
    return 204, None


@router.get(
    "/teams/{team_id}/webhooks/{webhook_id}/deliveries",
    response={200: Page[DeliveryOut], **ERRORS},
    summary="Deliveries to this endpoint, newest first, with every attempt",
)
def webhook_deliveries(
    request: HttpRequest, team_id: int, webhook_id: str, page: Query[PageParams]
) -> Any:
    endpoint = _webhook(team_id, webhook_id)
    rows = WebhookDelivery.objects.filter(endpoint=endpoint).prefetch_related(
        Prefetch("log", queryset=WebhookAttempt.objects.order_by("number"))
    )
    return page.of(rows, DeliveryOut.of)


class NotificationsIn(Schema):
    alert_emails: list[str] = Field(default_factory=list, max_length=20)


class NotificationsOut(Schema):
    team_id: int
    alert_emails: list[str]


@router.get("/teams/{team_id}/notifications", response={200: NotificationsOut, **ERRORS})
def notifications_get(request: HttpRequest, team_id: int) -> NotificationsOut:
    _team_or_404(team_id)
    row = notifications.notification_settings_get(team_id=team_id)
    return NotificationsOut(team_id=team_id, alert_emails=list(row.alert_emails))


@router.api_operation(
    ["PUT", "PATCH"], "/teams/{team_id}/notifications", response={200: NotificationsOut, **ERRORS}
)
def notifications_set(
    request: HttpRequest, team_id: int, payload: NotificationsIn
) -> NotificationsOut:
    _team_or_404(team_id)
    row = notifications.notification_settings_set(
        team_id=team_id, alert_emails=payload.alert_emails, actor=ADMIN_ACTOR
    )
    return NotificationsOut(team_id=team_id, alert_emails=list(row.alert_emails))


# --- usage (rollups + live tail) and reconciliation -----------------------------------------


class UsageQuery(Schema):
    since: datetime
    until: datetime
    team_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    tag: str | None = None
    group_by: str = Field("", description="comma-separated: team_id,key_id,model,deployment_id,tag")
    bucket: Literal["hour", "day"] | None = None


class UsageRowOut(Schema):
    bucket_start: datetime | None = None
    team_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    deployment_id: str | None = None
    tag: str | None = None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    list_cost_usd: str
    charged_cost_usd: str


@router.get(
    "/usage",
    response={200: list[UsageRowOut], **ERRORS},
    summary="Usage from the hourly/daily rollups plus the ledger's live tail",
)
def usage_report(request: HttpRequest, query: Query[UsageQuery]) -> list[UsageRowOut]:
    group_by = [g.strip() for g in query.group_by.split(",") if g.strip()]
    for name in group_by:
        if name not in usage.GROUPABLE:
            raise GatewayError(
                f"Cannot group by {name!r}; use any of {', '.join(usage.GROUPABLE)}.",
                400,
                code="invalid_parameter",
                param="group_by",
            )
    if query.until <= query.since:
        raise GatewayError("'until' must be after 'since'.", 400, code="invalid_parameter")
    rows = usage.usage_report(
        since=query.since,
        until=query.until,
        team_id=query.team_id,
        key_id=query.key_id,
        model=query.model,
        tag=query.tag,
        group_by=group_by,  # type: ignore[arg-type]
        bucket=query.bucket,
    )
    return [
        UsageRowOut(
            **{k: v for k, v in row.items() if not k.endswith("_micro_usd")},
            list_cost_usd=micro_usd_to_str(row["list_cost_micro_usd"]),
            charged_cost_usd=micro_usd_to_str(row["charged_cost_micro_usd"]),
        )
        for row in rows
    ]


class ReconcileIn(Schema):
    since: datetime
    until: datetime
    repair: bool = False


class ReconciliationOut(Schema):
    id: int
    window_start: datetime
    window_end: datetime
    cutoff: datetime | None
    buckets_checked: int
    ok: bool
    differences: list[dict[str, Any]]
    repaired: bool
    created_at: datetime

    @staticmethod
    def of(run: ReconciliationRun) -> ReconciliationOut:
        return ReconciliationOut(
            id=run.id,
            window_start=run.window_start,
            window_end=run.window_end,
            cutoff=run.cutoff,
            buckets_checked=run.buckets_checked,
            ok=run.ok,
            differences=list(run.differences or []),
            repaired=run.repaired,
            created_at=run.created_at,
        )


@router.get("/usage/reconciliations", response={200: Page[ReconciliationOut], **ERRORS})
def reconciliation_list(request: HttpRequest, page: Query[PageParams]) -> Any:
    return page.of(ReconciliationRun.objects.all(), ReconciliationOut.of)


@router.post(
    "/usage/reconciliations",
    response={200: ReconciliationOut, **ERRORS},
    summary="Compare the rollups with the ledger over a window now",
)
def reconciliation_run(request: HttpRequest, payload: ReconcileIn) -> ReconciliationOut:
    run = rollups.rollups_reconcile(since=payload.since, until=payload.until, repair=payload.repair)
    return ReconciliationOut.of(run)


# --- reconciliation with the providers' bills -----------------------------------------------


class ProviderReconciliationQuery(Schema):
    provider: str | None = None
    since: date | None = Field(None, description="first UTC day, inclusive")
    until: date | None = Field(None, description="last UTC day, exclusive")


class ProviderReconciliationOut(Schema):
    provider: str
    model: str
    day: date
    ledger_requests: int
    ledger_cost_usd: str
    provider_cost_usd: str | None
    drift_usd: str | None
    drift_percent: str | None
    flagged: bool
    ledger_input_tokens: int
    ledger_output_tokens: int
    provider_input_tokens: int | None
    provider_output_tokens: int | None


def _usd(value: Decimal | None) -> str | None:
    """Six places like every amount here, more only when the provider billed finer (cents'
    fractions); fixed-point text, never exponent notation ("0E-12")."""
    if value is None:
        return None
    six = value.quantize(Decimal("0.000001"))
    return f"{six if six == value else value.normalize():f}"


@router.get(
    "/reconciliations/provider",
    response={200: Page[ProviderReconciliationOut], **ERRORS},
    summary="Our list cost against the providers' imported bills, per provider, model and day",
)
def provider_reconciliation_list(
    request: HttpRequest, query: Query[ProviderReconciliationQuery], page: Query[PageParams]
) -> dict[str, Any]:
    if query.since and query.until and query.until <= query.since:
        raise GatewayError("'until' must be after 'since'.", 400, code="invalid_parameter")
    threshold = settings.GATEWAY_RECONCILIATION_DRIFT_PERCENT
    rows = provider_reconciliation(provider=query.provider, since=query.since, until=query.until)
    return {
        "items": [
            ProviderReconciliationOut(
                provider=r.provider,
                model=r.model,
                day=r.day,
                ledger_requests=r.ledger_requests,
                ledger_cost_usd=micro_usd_to_str(r.ledger_cost_micro_usd),
                provider_cost_usd=_usd(r.provider_cost_usd),
                drift_usd=_usd(r.drift_usd),
                drift_percent=None if r.drift_percent is None else str(r.drift_percent),
                flagged=r.drifts(threshold),
                ledger_input_tokens=r.ledger_input_tokens,
                ledger_output_tokens=r.ledger_output_tokens,
                provider_input_tokens=r.provider_input_tokens,
                provider_output_tokens=r.provider_output_tokens,
            )
            for r in rows[page.offset : page.offset + page.limit]
        ],
        "count": len(rows),
        "limit": page.limit,
        "offset": page.offset,
    }
