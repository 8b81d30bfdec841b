"""The audit log: who changed what and when, with the values before and after."""

from __future__ import annotations

from django.http import HttpResponse
from django.views.decorators.http import require_GET

from dashboard.access import DashboardRequest, dashboard_view, require
from dashboard.forms import AuditFilterForm
from dashboard.selectors.audit import AuditFilter, audit_changes, audit_entries
from dashboard.selectors.common import paginate
from dashboard.views.common import choices, page, team_options


@require_GET
@dashboard_view
def audit_log(request: DashboardRequest) -> HttpResponse:
    viewer = request.viewer
    require(viewer.can_view_audit)
    teams = [t for t in team_options(viewer) if viewer.can_view_team_details(t.id)]
    form = AuditFilterForm(request.GET, teams=choices(teams))
    form.is_valid()
    data = form.cleaned_data
    filters = AuditFilter(object_type=data.get("object_type") or "", team_id=data.get("team"))
    entries_page = paginate(audit_entries(viewer, filters), request.GET.get("page"), 30)
    team_names = {t.id: t.name for t in teams}
    entries = [
        (entry, audit_changes(entry), team_names.get(entry.team_id or 0, ""))
        for entry in entries_page.object_list
    ]
    return page(
        request,
        "dashboard/audit.html",
        {"form": form, "page_obj": entries_page, "entries": entries},
        section="audit",
    )
