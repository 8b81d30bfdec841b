"""Models: deployments (credentials write-only), aliases, routing policies, and a test call."""

from __future__ import annotations

from functools import partial

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from core.errors import GatewayError
from dashboard import services
from dashboard.access import DashboardRequest, dashboard_view, require
from dashboard.forms import AliasForm, DeploymentForm, GroupForm
from dashboard.selectors.common import paginate
from dashboard.views.common import form_error, page, posted, save_changes
from gateway import services as gateway_services
from gateway.models import ModelDeployment
from gateway.selectors import (
    alias_get,
    aliases,
    deployment_get,
    deployment_names,
    deployments,
    group_get,
    groups_by_name,
    model_exists,
    model_names,
)


def _deployment(public_id: str) -> ModelDeployment:
    deployment = deployment_get(public_id)
    if deployment is None:
        raise Http404("No such deployment.")
    return deployment


@require_http_methods(["GET"])
@dashboard_view
def model_list(request: DashboardRequest) -> HttpResponse:
    require(request.viewer.can_view_models)
    deployments_page = paginate(deployments(), request.GET.get("page"))
    rows = list(deployments_page.object_list)
    aliases_page = paginate(aliases(), request.GET.get("apage"), 10)
    names = sorted({d.name for d in rows})
    return page(
        request,
        "dashboard/models/list.html",
        {
            "page_obj": deployments_page,
            "deployments": rows,
            "aliases_page": aliases_page,
            "groups": groups_by_name(names),
            "alias_form": AliasForm(targets=model_names()),
            "can_manage": request.viewer.can_manage_models,
        },
        section="models",
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def deployment_create(request: DashboardRequest) -> HttpResponse:
    require(request.viewer.can_manage_models)
    form = DeploymentForm(posted(request))
    if request.method == "POST" and form.is_valid():
        fields = form.to_fields(creating=True)
        try:
            deployment = gateway_services.deployment_create(actor=request.user.username, **fields)
        except (GatewayError, ValidationError) as exc:
            form_error(form, exc)
        else:
            messages.success(request, f"Deployment of “{deployment.name}” added.")
            return redirect("dashboard:deployment", public_id=deployment.public_id)
    return page(
        request,
        "dashboard/models/form.html",
        {"form": form, "deployment": None},
        section="models",
        status=400 if form.is_bound else 200,
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def deployment_edit(request: DashboardRequest, public_id: str) -> HttpResponse:
    require(request.viewer.can_manage_models)
    deployment = _deployment(public_id)
    has_key = bool(deployment.api_key_encrypted)
    form = DeploymentForm(
        posted(request), initial=DeploymentForm.initial_for(deployment), has_api_key=has_key
    )
    if request.method == "POST" and form.is_valid():
        fields = form.to_fields(creating=False)
        update = partial(
            gateway_services.deployment_update, deployment=deployment, actor=request.user.username
        )
        # The API key is write-only (stored encrypted): a given one is always applied.
        if save_changes(
            request, form, deployment, fields, update, saved="Deployment saved.", always={"api_key"}
        ):
            return redirect("dashboard:deployment", public_id=deployment.public_id)
    return page(
        request,
        "dashboard/models/form.html",
        {"form": form, "deployment": deployment, "test": None},
        section="models",
        status=400 if form.is_bound else 200,
    )


@require_POST
@dashboard_view
def deployment_delete(request: DashboardRequest, public_id: str) -> HttpResponse:
    require(request.viewer.can_manage_models)
    deployment = _deployment(public_id)
    gateway_services.deployment_delete(deployment=deployment, actor=request.user.username)
    messages.success(request, f"Deployment of “{deployment.name}” deleted.")
    return redirect("dashboard:models")


@require_POST
@dashboard_view
def deployment_test(request: DashboardRequest, public_id: str) -> HttpResponse:
    require(request.viewer.can_manage_models)
    deployment = _deployment(public_id)
    result = services.deployment_test(deployment=deployment)
    form = DeploymentForm(
        initial=DeploymentForm.initial_for(deployment),
        has_api_key=bool(deployment.api_key_encrypted),
    )
    return page(
        request,
        "dashboard/models/form.html",
        {"form": form, "deployment": deployment, "test": result},
        section="models",
    )


@require_http_methods(["GET", "POST"])
@dashboard_view
def group_edit(request: DashboardRequest, name: str) -> HttpResponse:
    require(request.viewer.can_manage_models)
    if not model_exists(name):
        raise Http404("No such model.")
    group = group_get(name)
    known = model_names()
    form = GroupForm(posted(request), initial=GroupForm.initial_for(group), model=name, known=known)
    if request.method == "POST" and form.is_valid():
        try:
            gateway_services.group_save(name=name, actor=request.user.username, **form.cleaned_data)
        except (GatewayError, ValidationError) as exc:
            form_error(form, exc)
        else:
            messages.success(request, f"Routing policy of “{name}” saved.")
            return redirect("dashboard:models")
    return page(
        request,
        "dashboard/models/group.html",
        {"form": form, "name": name, "group": group, "known": known},
        section="models",
        status=400 if form.is_bound else 200,
    )


@require_POST
@dashboard_view
def group_delete(request: DashboardRequest, name: str) -> HttpResponse:
    require(request.viewer.can_manage_models)
    group = group_get(name)
    if group is None:
        raise Http404("No routing policy for that model.")
    gateway_services.group_delete(group=group, actor=request.user.username)
    messages.success(request, f"“{name}” is back to the default routing policy.")
    return redirect("dashboard:models")


@require_POST
@dashboard_view
def alias_create(request: DashboardRequest) -> HttpResponse:
    require(request.viewer.can_manage_models)
    form = AliasForm(request.POST, targets=deployment_names())
    if form.is_valid():
        try:
            alias = gateway_services.alias_create(
                alias=form.cleaned_data["alias"].strip(),
                target=form.cleaned_data["target"],
                actor=request.user.username,
            )
        except GatewayError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"“{alias.alias}” now serves {alias.target}.")
    else:
        errors = "; ".join(
            f"{field}: {' '.join(str(m) for m in problems)}"
            for field, problems in form.errors.items()
        )
        messages.error(request, f"The alias was not added. {errors}")
    return redirect("dashboard:models")


@require_POST
@dashboard_view
def alias_delete(request: DashboardRequest, alias_id: int) -> HttpResponse:
    require(request.viewer.can_manage_models)
    alias = alias_get(alias_id)
    if alias is None:
        raise Http404("No such alias.")
    gateway_services.alias_delete(alias=alias, actor=request.user.username)
    messages.success(request, f"Alias “{alias.alias}” removed.")
    return redirect("dashboard:models")
