"""Teams: list, create, edit (platform admins), and members (team admins)."""

from __future__ import annotations

from functools import partial

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from accounts import services as account_services
from accounts.models import Membership, Team
from accounts.selectors import membership_get, user_by_username
from core.errors import GatewayError
from dashboard.access import (
    DashboardRequest,
    dashboard_view,
    get_team_for_config,
    get_team_for_details,
    get_team_for_members,
    require,
)
from dashboard.forms import (
    AlertRecipientsForm,
    KeyPolicyForm,
    MemberAddForm,
    MemberRoleForm,
    TeamForm,
)
from dashboard.selectors.common import paginate
from dashboard.selectors.teams import (
    alert_recipients,
    team_budgets,
    team_members,
    teams_with_counts,
)
from dashboard.selectors.webhooks import webhook_count
from dashboard.views.common import form_error, page, posted, save_changes
from gateway.selectors import model_names


@require_http_methods(["GET"])
@dashboard_view
def team_list(request: DashboardRequest) -> HttpResponse:
    teams_page = paginate(
        teams_with_counts(request.viewer).order_by("name"), request.GET.get("page")
    )
    budgets = team_budgets(list(teams_page.object_list))
    rows = [(b, request.viewer.can_view_team_details(b.team.id)) for b in budgets]
    return page(
        request,
        "dashboard/teams/list.html",
        {"page_obj": teams_page, "rows": rows},
        section="teams",
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def team_create(request: DashboardRequest) -> HttpResponse:
    require(request.viewer.can_create_teams)
    form = TeamForm(posted(request), initial={"alert_thresholds": "50, 80, 100"})
    if request.method == "POST" and form.is_valid():
        try:
            team = account_services.team_create(actor=request.user.username, **form.to_fields())
        except (GatewayError, ValidationError) as exc:
            form_error(form, exc)
        else:
            messages.success(request, f"Team “{team.name}” created.")
            return redirect("dashboard:team", team_id=team.id)
    return page(
        request,
        "dashboard/teams/form.html",
        {"form": form, "team": None},
        section="teams",
        status=400 if form.is_bound else 200,
    )


def team_page(
    request: DashboardRequest,
    team: Team,
    *,
    add_form: MemberAddForm | None = None,
    alerts_form: AlertRecipientsForm | None = None,
    status: int = 200,
) -> HttpResponse:
    """The team page, also shown again (with errors) by the forms on it."""
    viewer = request.viewer
    members_page = paginate(team_members(team), request.GET.get("page"))
    can_notify = viewer.can_manage_notifications(team.id)
    recipients = alert_recipients(team)
    if alerts_form is None and can_notify:
        alerts_form = AlertRecipientsForm(initial={"alert_emails": "\n".join(recipients)})
    return page(
        request,
        "dashboard/teams/detail.html",
        {
            "team": team,
            "budget": team_budgets([team])[0],
            "page_obj": members_page,
            "add_form": add_form or MemberAddForm(),
            "can_manage_members": viewer.can_manage_members(team.id),
            "can_configure": viewer.can_configure_team(team.id),
            "can_manage_notifications": can_notify,
            "alert_recipients": recipients,
            "alerts_form": alerts_form,
            "webhook_count": webhook_count(team) if can_notify else None,
            "can_view_invoices": viewer.can_view_invoices_of(team.id),
        },
        section="teams",
        status=status,
    )


@require_http_methods(["GET"])
@dashboard_view
def team_detail(request: DashboardRequest, team_id: int) -> HttpResponse:
    return team_page(request, get_team_for_details(request.viewer, team_id))


@require_http_methods(["GET", "POST"])
@dashboard_view
def team_edit(request: DashboardRequest, team_id: int) -> HttpResponse:
    team = get_team_for_config(request.viewer, team_id)
    form = TeamForm(posted(request), initial=TeamForm.initial_for(team))
    if request.method == "POST" and form.is_valid():
        update = partial(account_services.team_update, team=team, actor=request.user.username)
        if save_changes(
            request, form, team, form.to_fields(), update, saved="Team settings saved."
        ):
            return redirect("dashboard:team", team_id=team.id)
    return page(
        request,
        "dashboard/teams/form.html",
        {"form": form, "team": team},
        section="teams",
        status=400 if form.is_bound else 200,
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def team_key_policy(request: DashboardRequest, team_id: int) -> HttpResponse:
    """The caps on members' keys: set by the team's admins (and platform admins)."""
    team = get_team_for_members(request.viewer, team_id)
    form = KeyPolicyForm(posted(request), initial=KeyPolicyForm.initial_for(team))
    form.setup(models=model_names())
    if request.method == "POST" and form.is_valid():
        update = partial(account_services.team_update, team=team, actor=request.user.username)
        if save_changes(
            request, form, team, form.to_fields(), update, saved="Member key policy saved."
        ):
            return redirect("dashboard:team", team_id=team.id)
    return page(
        request,
        "dashboard/teams/key_policy.html",
        {"form": form, "team": team},
        section="teams",
        status=400 if form.is_bound else 200,
    )


@require_POST
@dashboard_view
def member_add(request: DashboardRequest, team_id: int) -> HttpResponse:
    team = get_team_for_members(request.viewer, team_id)
    form = MemberAddForm(request.POST)
    if form.is_valid():
        user = user_by_username(form.cleaned_data["username"].strip())
        if user is None:
            form.add_error("username", "No user with that username; a platform admin adds users.")
        else:
            try:
                account_services.membership_add(
                    team=team,
                    user=user,
                    role=form.cleaned_data["role"],
                    actor=request.user.username,
                )
            except GatewayError as exc:
                form_error(form, exc)
            else:
                messages.success(request, f"{user.username} added to {team.name}.")
                return redirect("dashboard:team", team_id=team.id)
    return team_page(request, team, add_form=form, status=400)


def _membership(team_id: int, membership_id: int) -> Membership:
    membership = membership_get(team_id=team_id, membership_id=membership_id)
    if membership is None:
        raise Http404("No such member.")
    return membership


@require_POST
@dashboard_view
def member_role(request: DashboardRequest, team_id: int, membership_id: int) -> HttpResponse:
    team = get_team_for_members(request.viewer, team_id)
    membership = _membership(team.id, membership_id)
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Pick a role: team admin or member.")
    else:
        try:
            account_services.membership_set_role(
                membership=membership, role=form.cleaned_data["role"], actor=request.user.username
            )
        except GatewayError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(
                request, f"{membership.user.username} is now {form.cleaned_data['role']}."
            )
    return redirect("dashboard:team", team_id=team.id)


@require_POST
@dashboard_view
def member_remove(request: DashboardRequest, team_id: int, membership_id: int) -> HttpResponse:
    team = get_team_for_members(request.viewer, team_id)
    membership = _membership(team.id, membership_id)
    try:
        account_services.membership_remove(membership=membership, actor=request.user.username)
    except GatewayError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{membership.user.username} removed from {team.name}.")
    return redirect("dashboard:team", team_id=team.id)
