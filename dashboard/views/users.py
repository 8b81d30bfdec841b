"""People: platform admins add users and give platform roles (finance, platform admin)."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from accounts import services as account_services
from accounts.selectors import finance_user_ids, user_get, users_with_team_counts
from core.errors import GatewayError
from dashboard.access import DashboardRequest, dashboard_view, require
from dashboard.forms import PlatformRoleForm, UserCreateForm
from dashboard.selectors.common import paginate
from dashboard.views.common import form_error, page, posted


def _users_page(request: DashboardRequest, form: UserCreateForm, status: int = 200) -> HttpResponse:
    users_page = paginate(users_with_team_counts(), request.GET.get("page"))
    rows = list(users_page.object_list)
    finance = finance_user_ids(u.id for u in rows)
    return page(
        request,
        "dashboard/users.html",
        {
            "page_obj": users_page,
            "rows": [(u, account_services.platform_role_of(u, finance)) for u in rows],
            "form": form,
            "roles": list(account_services.PLATFORM_ROLES.items()),
        },
        section="users",
        status=status,
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def user_list(request: DashboardRequest) -> HttpResponse:
    require(request.viewer.can_manage_users)
    form = UserCreateForm(posted(request))
    if request.method == "POST":
        if form.is_valid():
            try:
                user = account_services.user_create(
                    username=form.cleaned_data["username"].strip(),
                    email=form.cleaned_data["email"],
                    password=form.cleaned_data["password"],
                    platform_role=form.cleaned_data["platform_role"] or "",
                    actor=request.user.username,
                )
            except GatewayError as exc:
                form_error(form, exc)
            else:
                messages.success(request, f"{user.username} can now sign in.")
                return redirect("dashboard:users")
        return _users_page(request, form, status=400)
    return _users_page(request, form)


@require_POST
@dashboard_view
def user_role(request: DashboardRequest, user_id: int) -> HttpResponse:
    require(request.viewer.can_manage_users)
    user = user_get(user_id)
    if user is None:
        raise Http404("No such user.")
    form = PlatformRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Pick a platform role.")
    else:
        try:
            account_services.user_set_platform_role(
                user=user,
                platform_role=form.cleaned_data["platform_role"] or "",
                actor_user=request.user,
            )
        except GatewayError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"{user.username}'s platform role saved.")
    return redirect("dashboard:users")
