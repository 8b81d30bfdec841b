"""Virtual keys: issue (the secret is shown once), limits, rotation and revocation."""

from __future__ import annotations

from functools import partial

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import redirect
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_http_methods, require_POST

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import Team
from accounts.services import IssuedKey
from core.errors import GatewayError
from dashboard.access import (
    DashboardRequest,
    dashboard_view,
    get_key_for_limits,
    get_key_for_manager,
    get_key_for_viewer,
    require,
)
from dashboard.forms import KeyEditForm, KeyIssueForm, RotateForm
from dashboard.selectors.common import paginate
from dashboard.selectors.keys import KeyFilter, key_rows, key_secrets, keys_for, with_key_hints
from dashboard.views.common import form_error, page, posted, save_changes
from gateway.selectors import model_names

STATUSES = [("active", "Active"), ("revoked", "Revoked"), ("all", "All")]


@require_http_methods(["GET"])
@dashboard_view
def key_list(request: DashboardRequest) -> HttpResponse:
    viewer = request.viewer
    status = request.GET.get("status", "active")
    status = status if status in dict(STATUSES) else "active"
    try:
        team_id = int(request.GET["team"]) if request.GET.get("team") else None
    except ValueError:
        team_id = None
    search = request.GET.get("q", "").strip()[:200]
    keys = keys_for(viewer, KeyFilter(team_id=team_id, status=status, search=search))
    keys_page = paginate(keys, request.GET.get("page"))
    return page(
        request,
        "dashboard/keys/list.html",
        {
            "page_obj": keys_page,
            "rows": key_rows(list(keys_page.object_list)),
            "statuses": STATUSES,
            "status": status,
            "search": search,
            "team_id": team_id,
        },
        section="keys",
    )


def _issuable_teams(request: DashboardRequest) -> list[Team]:
    viewer = request.viewer
    teams = account_selectors.teams(None if viewer.is_platform_admin else viewer.team_roles)
    return list(teams.order_by("name")[:500])


@require_http_methods(["GET", "POST"])
@dashboard_view
def key_issue(request: DashboardRequest) -> HttpResponse:
    viewer = request.viewer
    require(viewer.can_issue_keys)
    teams = _issuable_teams(request)
    initial_team = request.GET.get("team")
    form = KeyIssueForm(posted(request), initial={"team": initial_team})
    team_field = form.fields["team"]
    team_field.queryset = account_selectors.teams(t.id for t in teams)  # type: ignore[attr-defined]
    # Limits are for team admins; a member's key lives within the team's limits, and
    # where the team has a member key policy the member sets them within its caps.
    can_set_limits = any(
        viewer.can_set_key_limits_in(t.id) or t.has_member_key_policy for t in teams
    )
    form.setup(models=model_names(), can_set_limits=can_set_limits)
    if request.method == "POST" and form.is_valid():
        team = form.cleaned_data["team"]
        fields = form.limit_fields()
        bound = viewer.bound_by_key_policy(team.id)
        if bound and not team.has_member_key_policy:
            fields = {"expires_at": fields.get("expires_at")}
        try:
            issued = account_services.key_create(
                team=team,
                name=form.cleaned_data["name"],
                owner=request.user,
                actor=request.user.username,
                as_member=bound,
                **fields,
            )
        except (GatewayError, ValidationError) as exc:
            form_error(form, exc)
        else:
            return _secret_page(request, issued, created=True)
    return page(
        request,
        "dashboard/keys/issue.html",
        {"form": form},
        section="keys",
        status=400 if form.is_bound else 200,
    )


def _secret_page(request: DashboardRequest, issued: IssuedKey, *, created: bool) -> HttpResponse:
    """The one time the secret is shown: rendered into this response, stored nowhere."""
    base = request.build_absolute_uri("/").rstrip("/")
    response = page(
        request,
        "dashboard/keys/secret.html",
        {
            "key": issued.key,
            "secret": issued.secret,
            "created": created,
            "openai_base_url": f"{base}/v1",
            "anthropic_base_url": base,
            "example_model": (issued.key.allowed_models or model_names() or ["gpt-4o-mini"])[0],
        },
        section="keys",
        status=201 if created else 200,
    )
    add_never_cache_headers(response)
    return response


@require_http_methods(["GET"])
@dashboard_view
def key_detail(request: DashboardRequest, key_id: int) -> HttpResponse:
    viewer = request.viewer
    key = get_key_for_viewer(viewer, key_id)
    annotated = with_key_hints(account_selectors.keys([key.id])).get()
    row = key_rows([annotated])[0]
    return page(
        request,
        "dashboard/keys/detail.html",
        {
            "key": annotated,
            "row": row,
            "secrets": key_secrets(key),
            "rotate_form": RotateForm(),
            "can_manage": viewer.can_manage_key(key),
            "can_set_limits": viewer.can_set_key_limits(key),
        },
        section="keys",
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def key_edit(request: DashboardRequest, key_id: int) -> HttpResponse:
    key = get_key_for_limits(request.viewer, key_id)
    require(key.revoked_at is None)
    form = KeyEditForm(posted(request), initial=KeyEditForm.initial_for(key))
    form.setup(models=model_names(), can_set_limits=True)
    if request.method == "POST" and form.is_valid():
        fields = {"name": form.cleaned_data["name"], **form.limit_fields()}
        update = partial(
            account_services.key_update,
            key=key,
            actor=request.user.username,
            as_member=request.viewer.bound_by_key_policy(key.team_id),
        )
        if save_changes(request, form, key, fields, update, saved="Key settings saved."):
            return redirect("dashboard:key", key_id=key.id)
    return page(
        request,
        "dashboard/keys/edit.html",
        {"form": form, "key": key},
        section="keys",
        status=400 if form.is_bound else 200,
    )


@require_POST
@dashboard_view
def key_revoke(request: DashboardRequest, key_id: int) -> HttpResponse:
    key = get_key_for_manager(request.viewer, key_id)
    account_services.key_revoke(key=key, actor=request.user.username)
    messages.success(request, f"Key “{key.name}” revoked. Calls with it are refused from now on.")
    return redirect("dashboard:key", key_id=key.id)


@require_POST
@dashboard_view
def key_rotate(request: DashboardRequest, key_id: int) -> HttpResponse:
    key = get_key_for_manager(request.viewer, key_id)
    form = RotateForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Pick how long the old secret keeps working.")
        return redirect("dashboard:key", key_id=key.id)
    try:
        issued = account_services.key_rotate(
            key=key,
            grace_seconds=form.cleaned_data["grace_seconds"],
            actor=request.user.username,
            as_member=request.viewer.bound_by_key_policy(key.team_id),
        )
    except GatewayError as exc:
        messages.error(request, exc.message)
        return redirect("dashboard:key", key_id=key.id)
    return _secret_page(request, issued, created=False)
