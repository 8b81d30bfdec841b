"""Reconciliation: the ledger's list cost against the providers' imported bills.

Finance and platform admins only: what the company pays its providers is nobody
else's business. Imports are made with `manage.py billing_reconcile_import`.
"""

from __future__ import annotations

import re

from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from dashboard.access import DashboardRequest, dashboard_view, require
from dashboard.selectors import reconciliation as selectors
from dashboard.selectors.common import paginate
from dashboard.views.common import page

MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


@require_GET
@dashboard_view
def reconciliation(request: DashboardRequest) -> HttpResponse:
    require(request.viewer.can_view_reconciliation)
    month = request.GET.get("month", "")
    if not MONTH.fullmatch(month):
        month = selectors.latest_month() or f"{timezone.now():%Y-%m}"
    providers = selectors.providers()
    provider = request.GET.get("provider", "")
    if provider not in providers:
        provider = ""
    report = selectors.reconciliation_report(month=month, provider=provider)
    return page(
        request,
        "dashboard/reconciliation.html",
        {
            "report": report,
            "providers": providers,
            "page_obj": paginate(report.lines, request.GET.get("page"), size=100),
        },
        section="reconciliation",
    )
