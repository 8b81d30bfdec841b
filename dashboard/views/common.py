"""What every dashboard view shares: rendering with the navigation, team choices, windows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db import models
from django.http import HttpResponse
from django.shortcuts import render
from django.utils import timezone

from accounts.models import Team
from core.errors import GatewayError
from dashboard.access import DashboardRequest, Viewer
from dashboard.charts import Window, period_window, trailing_window
from dashboard.selectors.common import visible_teams


def page(
    request: DashboardRequest,
    template: str,
    context: dict[str, Any],
    *,
    section: str,
    status: int = 200,
) -> HttpResponse:
    return render(
        request,
        template,
        {"viewer": request.viewer, "section": section, "now": timezone.now(), **context},
        status=status,
    )


def team_options(viewer: Viewer) -> list[Team]:
    """The teams a viewer can pick in filters (small: names and periods only)."""
    return list(visible_teams(viewer).only("id", "name", "budget_period", "timezone")[:500])


def choices(teams: list[Team]) -> list[tuple[int, str]]:
    return [(team.id, team.name) for team in teams]


def default_window(team: Team | None, teams: list[Team], range_name: str = "period") -> Window:
    """This period: the selected (or only) team's budget period, else the UTC month."""
    anchor = team or (teams[0] if len(teams) == 1 else None)
    tz_name = anchor.timezone if anchor else "UTC"
    if range_name in ("7d", "30d", "90d"):
        return trailing_window(int(range_name[:-1]), tz_name)
    if anchor is not None:
        return period_window(anchor.budget_period, anchor.timezone)
    return period_window("monthly", "UTC")


# Model field → form field, where a form takes USD and the model stores micro-USD.
_FORM_FIELDS = {"budget_micro_usd": "budget_usd", "max_budget_micro_usd": "max_budget_usd"}


def form_error(form: forms.Form, exc: Exception) -> None:
    """Show a service's refusal on the form, next to the field it names when it does."""
    if isinstance(exc, ValidationError) and hasattr(exc, "error_dict"):
        for field, errors in exc.error_dict.items():
            name = _FORM_FIELDS.get(field, field)
            target = name if name in form.fields else None
            for error in errors:
                form.add_error(target, error.messages)
        return
    if isinstance(exc, GatewayError):
        wanted = _FORM_FIELDS.get(exc.param or "", exc.param or "")
        param = wanted if wanted in form.fields else None
        form.add_error(param, exc.message)
        return
    if isinstance(exc, ValidationError):
        form.add_error(None, exc.messages)
        return
    raise exc


def save_changes(
    request: DashboardRequest,
    form: forms.Form,
    obj: models.Model,
    fields: dict[str, Any],
    update: Callable[..., object],
    *,
    saved: str,
    always: Iterable[str] = (),
) -> bool:
    """Pass `update` only the fields that differ from `obj` (so the audit log records
    real changes), plus those in `always` (write-only values such as a credential).

    True when saved (or nothing changed), with a message for the next page; False when
    the service refused, with its error on the form and `obj` reloaded from the database.
    """
    changed = {k: v for k, v in fields.items() if k in always or getattr(obj, k) != v}
    try:
        if changed:
            update(**changed)
    except (GatewayError, ValidationError) as exc:
        obj.refresh_from_db()
        form_error(form, exc)
        return False
    messages.success(request, saved if changed else "Nothing changed.")
    return True


def posted(request: DashboardRequest) -> Any:
    """The form data of a POST (even an empty one, which must fail validation), else None."""
    return request.POST if request.method == "POST" else None
