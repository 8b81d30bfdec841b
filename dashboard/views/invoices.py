"""Invoices: list, detail, draft a closed month, finalize, void, CSV and printable HTML.

Finance and platform admins do everything; a team admin reads the invoices issued to
their team (finalized or void), never drafts; members see none. The money logic is
billing.invoices': these views check who asks, call it, and show the result.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from billing import invoices
from billing.models import Invoice, InvoiceStatus
from core.errors import GatewayError
from dashboard.access import (
    DashboardRequest,
    dashboard_view,
    get_invoice_for_manager,
    get_invoice_for_viewer,
    require,
)
from dashboard.forms import (
    INVOICE_STATUSES,
    InvoiceDraftForm,
    InvoiceFilterForm,
    InvoiceVoidForm,
)
from dashboard.selectors import invoices as invoices_selectors
from dashboard.selectors.common import paginate
from dashboard.selectors.invoices import ISSUED_STATUSES, InvoiceQuery, invoices_for
from dashboard.views.common import choices, page, team_options


def _last_month() -> str:
    first_of_this_month = timezone.now().date().replace(day=1)
    return f"{first_of_this_month - timedelta(days=1):%Y-%m}"


def _list_page(
    request: DashboardRequest, draft_form: InvoiceDraftForm | None = None, status: int = 200
) -> HttpResponse:
    viewer = request.viewer
    teams = team_options(viewer)
    if not viewer.can_manage_invoices:
        teams = [t for t in teams if viewer.can_view_invoices_of(t.id)]
    statuses = (
        INVOICE_STATUSES
        if viewer.can_manage_invoices
        else [s for s in INVOICE_STATUSES if s[0] in ISSUED_STATUSES]
    )
    form = InvoiceFilterForm(request.GET, teams=choices(teams), statuses=statuses)
    form.is_valid()
    data = form.cleaned_data
    query = InvoiceQuery(
        team_id=data.get("team"), status=data.get("status") or "", period=data.get("period") or ""
    )
    invoices_page = paginate(invoices_for(viewer, query), request.GET.get("page"))
    if draft_form is None and viewer.can_manage_invoices:
        draft_form = InvoiceDraftForm(
            initial={"month": _last_month(), "team": query.team_id}, teams=choices(teams)
        )
    return page(
        request,
        "dashboard/invoices/list.html",
        {"form": form, "page_obj": invoices_page, "draft_form": draft_form},
        section="invoices",
        status=status,
    )


@require_GET
@dashboard_view
def invoice_list(request: DashboardRequest) -> HttpResponse:
    require(request.viewer.can_view_invoices)
    return _list_page(request)


@require_POST
@dashboard_view
def invoice_draft(request: DashboardRequest) -> HttpResponse:
    """Draft (or recompute the draft of) a team's invoice for a month that has ended."""
    viewer = request.viewer
    require(viewer.can_manage_invoices)
    form = InvoiceDraftForm(request.POST, teams=choices(team_options(viewer)))
    if form.is_valid():
        year, month = form.year_month()
        try:
            invoice = invoices.invoice_draft(
                team_id=form.cleaned_data["team"],
                year=year,
                month=month,
                actor=request.user.username,
            )
        except GatewayError as exc:
            # "month" is the form's name for what billing calls year and month.
            form.add_error("month" if exc.param in ("month", "year", None) else None, exc.message)
        else:
            if invoice.status == InvoiceStatus.DRAFT:
                messages.success(request, f"Draft for {invoice.period_label} computed.")
            else:
                messages.info(
                    request, f"{invoice.period_label} is already invoiced ({invoice.number})."
                )
            return redirect("dashboard:invoice", invoice_id=invoice.id)
    return _list_page(request, draft_form=form, status=400)


@require_GET
@dashboard_view
def invoice_detail(request: DashboardRequest, invoice_id: int) -> HttpResponse:
    viewer = request.viewer
    invoice = get_invoice_for_viewer(viewer, invoice_id)
    can_manage = viewer.can_manage_invoices
    return page(
        request,
        "dashboard/invoices/detail.html",
        {
            "detail": invoices_selectors.invoice_detail(invoice),
            "invoice": invoice,
            "can_finalize": can_manage and invoice.status == InvoiceStatus.DRAFT,
            "can_void": can_manage and invoice.status == InvoiceStatus.FINALIZED,
            "void_form": InvoiceVoidForm(),
        },
        section="invoices",
    )


@require_POST
@dashboard_view
def invoice_finalize(request: DashboardRequest, invoice_id: int) -> HttpResponse:
    invoice = get_invoice_for_manager(request.viewer, invoice_id)
    try:
        done = invoices.invoice_finalize(invoice_id=invoice.id, actor=request.user.username)
    except GatewayError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(
            request, f"Invoice {done.number} finalized: it can no longer change, only be voided."
        )
    return redirect("dashboard:invoice", invoice_id=invoice.id)


@require_POST
@dashboard_view
def invoice_void(request: DashboardRequest, invoice_id: int) -> HttpResponse:
    invoice = get_invoice_for_manager(request.viewer, invoice_id)
    form = InvoiceVoidForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Say why the invoice is voided; the reason is kept on it.")
        return redirect("dashboard:invoice", invoice_id=invoice.id)
    try:
        invoices.invoice_void(
            invoice_id=invoice.id, reason=form.cleaned_data["reason"], actor=request.user.username
        )
    except GatewayError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Invoice {invoice.number} voided.")
    return redirect("dashboard:invoice", invoice_id=invoice.id)


def _filename(invoice: Invoice, ext: str) -> str:
    return f"{invoice.number or f'draft-{invoice.id}'}-{invoice.period_label}.{ext}"


@require_GET
@dashboard_view
def invoice_csv(request: DashboardRequest, invoice_id: int) -> HttpResponse:
    invoice = get_invoice_for_viewer(request.viewer, invoice_id)
    response = HttpResponse(invoices.invoice_csv(invoice), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{_filename(invoice, "csv")}"'
    return response


@require_GET
@dashboard_view
def invoice_print(request: DashboardRequest, invoice_id: int) -> HttpResponse:
    """billing's printable invoice (A4, its own print stylesheet), as it is sent."""
    invoice = get_invoice_for_viewer(request.viewer, invoice_id)
    response = HttpResponse(invoices.invoice_html(invoice), content_type="text/html; charset=utf-8")
    response["Content-Disposition"] = f'inline; filename="{_filename(invoice, "html")}"'
    return response
