"""Invitations: a team admin invites by e-mail; the newcomer accepts through the link.

Forms live here, beside the only views that use them.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from accounts import invitations
from accounts.models import TeamRole
from dashboard.access import DashboardRequest, dashboard_view, get_team_for_members


class InviteForm(forms.Form):
    email = forms.EmailField(label="E-mail")
    role = forms.ChoiceField(choices=TeamRole.choices, initial=TeamRole.MEMBER)


class AcceptForm(forms.Form):
    username = forms.CharField(max_length=150)
    password = forms.CharField(widget=forms.PasswordInput, strip=False)
    password_again = forms.CharField(widget=forms.PasswordInput, strip=False)

    def clean(self) -> dict[str, object]:
        data = super().clean() or {}
        if data.get("password") != data.get("password_again"):
            self.add_error("password_again", "The two passwords differ.")
        return data


@require_POST
@dashboard_view
def invite(request: DashboardRequest, team_id: int) -> HttpResponse:
    team = get_team_for_members(request.viewer, team_id)
    form = InviteForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give a valid e-mail address and a role.")
        return redirect("dashboard:team", team_id=team.id)
    try:
        invitations.invitation_create(
            team=team,
            email=form.cleaned_data["email"],
            role=form.cleaned_data["role"],
            invited_by=request.user,
            link_for=lambda token: request.build_absolute_uri(
                reverse("dashboard:invitation", kwargs={"token": token})
            ),
        )
    except invitations.InvitationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Invitation sent to {form.cleaned_data['email']}.")
    return redirect("dashboard:team", team_id=team.id)


@require_http_methods(["GET", "POST"])
def accept(request: HttpRequest, token: str) -> HttpResponse:
    try:
        invitation = invitations.invitation_for_token(token=token)
    except invitations.InvitationError as exc:
        return render(
            request, "dashboard/invitations/accept.html", {"error": exc.message}, status=410
        )
    form = AcceptForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            user = invitations.invitation_accept(
                token=token,
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password"],
            )
        except invitations.InvitationError as exc:
            if exc.field:
                form.add_error(exc.field, exc.message)
            else:
                return render(
                    request, "dashboard/invitations/accept.html", {"error": exc.message}, status=410
                )
        else:
            login(request, user, backend="accounts.backends.PasswordLoginBackend")
            return redirect("dashboard:overview")
    return render(
        request,
        "dashboard/invitations/accept.html",
        {"form": form, "invitation": invitation},
        status=400 if form.errors else 200,
    )
