"""A team's webhook endpoints (the signing secret is shown once), their deliveries, and
its alert email recipients. Team admins for their team; platform admins for any.
"""

from __future__ import annotations

from functools import partial

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.models import Team
from billing import notifications, webhooks
from billing.models import WebhookEndpoint
from core.errors import GatewayError
from dashboard.access import DashboardRequest, dashboard_view, get_team_for_notifications
from dashboard.forms import AlertRecipientsForm, WebhookForm
from dashboard.selectors import webhooks as webhooks_selectors
from dashboard.selectors.common import paginate
from dashboard.selectors.webhooks import webhook_endpoint, webhook_endpoints
from dashboard.views.common import form_error, page, posted, save_changes
from dashboard.views.teams import team_page

DELIVERIES_PER_PAGE = 20


def _endpoint(team: Team, public_id: str) -> WebhookEndpoint:
    endpoint = webhook_endpoint(team, public_id)
    if endpoint is None:
        raise Http404("No such webhook endpoint.")
    return endpoint


@require_GET
@dashboard_view
def webhook_list(request: DashboardRequest, team_id: int) -> HttpResponse:
    team = get_team_for_notifications(request.viewer, team_id)
    endpoints = webhook_endpoints(team)
    return page(
        request,
        "dashboard/webhooks/list.html",
        {
            "team": team,
            "endpoints": endpoints,
            "can_add": len(endpoints) < webhooks.MAX_ENDPOINTS_PER_TEAM,
            "limit": webhooks.MAX_ENDPOINTS_PER_TEAM,
        },
        section="teams",
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def webhook_create(request: DashboardRequest, team_id: int) -> HttpResponse:
    team = get_team_for_notifications(request.viewer, team_id)
    form = WebhookForm(posted(request), creating=True)
    if request.method == "POST" and form.is_valid():
        try:
            created = webhooks.endpoint_create(
                team_id=team.id, actor=request.user.username, **form.to_fields()
            )
        except GatewayError as exc:
            form_error(form, exc)
        else:
            # The one time the secret is shown: rendered into this response, kept nowhere.
            response = page(
                request,
                "dashboard/webhooks/secret.html",
                {"team": team, "endpoint": created.endpoint, "secret": created.secret},
                section="teams",
                status=201,
            )
            add_never_cache_headers(response)
            return response
    return page(
        request,
        "dashboard/webhooks/form.html",
        {"team": team, "form": form, "endpoint": None},
        section="teams",
        status=400 if form.is_bound else 200,
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def webhook_edit(request: DashboardRequest, team_id: int, public_id: str) -> HttpResponse:
    team = get_team_for_notifications(request.viewer, team_id)
    endpoint = _endpoint(team, public_id)
    form = WebhookForm(posted(request), initial=WebhookForm.initial_for(endpoint))
    if request.method == "POST" and form.is_valid():
        update = partial(webhooks.endpoint_update, endpoint=endpoint, actor=request.user.username)
        if save_changes(
            request, form, endpoint, form.to_fields(), update, saved="Webhook endpoint saved."
        ):
            return redirect("dashboard:webhooks", team_id=team.id)
    return page(
        request,
        "dashboard/webhooks/form.html",
        {"team": team, "form": form, "endpoint": endpoint},
        section="teams",
        status=400 if form.is_bound else 200,
    )


@require_POST
@dashboard_view
def webhook_delete(request: DashboardRequest, team_id: int, public_id: str) -> HttpResponse:
    team = get_team_for_notifications(request.viewer, team_id)
    endpoint = _endpoint(team, public_id)
    webhooks.endpoint_delete(endpoint=endpoint, actor=request.user.username)
    messages.success(request, f"Webhook endpoint {endpoint.url} deleted, with its delivery log.")
    return redirect("dashboard:webhooks", team_id=team.id)


@require_GET
@dashboard_view
def webhook_deliveries(request: DashboardRequest, team_id: int, public_id: str) -> HttpResponse:
    team = get_team_for_notifications(request.viewer, team_id)
    endpoint = _endpoint(team, public_id)
    deliveries_page = paginate(
        webhooks_selectors.webhook_deliveries(endpoint),
        request.GET.get("page"),
        DELIVERIES_PER_PAGE,
    )
    return page(
        request,
        "dashboard/webhooks/deliveries.html",
        {"team": team, "endpoint": endpoint, "page_obj": deliveries_page},
        section="teams",
    )


@require_POST
@dashboard_view
def alert_recipients(request: DashboardRequest, team_id: int) -> HttpResponse:
    team = get_team_for_notifications(request.viewer, team_id)
    form = AlertRecipientsForm(request.POST)
    if form.is_valid():
        try:
            saved = notifications.notification_settings_set(
                team_id=team.id, alert_emails=form.recipients(), actor=request.user.username
            )
        except GatewayError as exc:
            form_error(form, exc)
        else:
            count = len(saved.alert_emails)
            messages.success(
                request,
                f"Budget alerts go to {count} address{'es' if count != 1 else ''}."
                if count
                else "Budget alerts are no longer emailed (webhooks still receive them).",
            )
            return redirect("dashboard:team", team_id=team.id)
    return team_page(request, team, alerts_form=form, status=400)
