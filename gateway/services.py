"""Writes to the data plane's tables: teams, keys, model deployments, groups, aliases.

Every change goes through a function here (never `.save()` at the edges), so that
bumping the configuration version and the audit log happen in one place. Each
function takes the `actor` to record: a dashboard user's name, "admin-api" for the
management API, "system" for commands.
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, TypedDict, Unpack

from django.db import transaction

from core.audit import audit, snapshot
from core.crypto import encrypt_secret
from core.errors import GatewayError, invalid_request
from gateway.models import ConfigVersion, ModelAlias, ModelDeployment, ModelGroup
from gateway.selectors import model_names


class DeploymentFields(TypedDict, total=False):
    """What a deployment create or update may set; `api_key` is stored encrypted, never as given."""

    api_base: str
    api_key: str | None
    api_version: str
    input_cost_per_million: Decimal | None
    output_cost_per_million: Decimal | None
    cached_input_cost_per_million: Decimal | None
    cache_write_cost_per_million: Decimal | None
    reasoning_cost_per_million: Decimal | None
    context_length: int | None
    max_output_tokens: int | None
    rpm_limit: int | None
    tpm_limit: int | None
    weight: int
    priority: int | None
    timeout_seconds: float | None
    drop_unsupported_params: bool
    capabilities: dict[str, Any]
    enabled: bool


class DeploymentChanges(DeploymentFields, total=False):
    """An update may also rename the deployment or point it at another provider model."""

    name: str
    provider_model: str


class GroupFields(TypedDict, total=False):
    """A public model's routing policy (gateway.models.ModelGroup)."""

    routing_strategy: str
    fallbacks: list[str]
    context_window_fallbacks: list[str]
    content_policy_fallbacks: list[str]
    num_retries: int
    retry_backoff_seconds: float
    max_retry_after_seconds: float
    allowed_fails: int
    cooldown_seconds: float


def config_version_bump() -> str:
    token = _secrets.token_hex(16)
    updated = ConfigVersion.objects.filter(singleton=True).update(token=token)
    if not updated:
        ConfigVersion.objects.get_or_create(singleton=True, defaults={"token": token})
    return token


# --- Model deployments ----------------------------------------------------------------


def _apply_deployment_fields(
    deployment: ModelDeployment, fields: DeploymentFields | DeploymentChanges
) -> list[str]:
    changed = []
    for attr, value in fields.items():
        if attr == "api_key":
            deployment.api_key_encrypted = encrypt_secret(str(value or ""))
            changed.append("api_key_encrypted")
        else:
            setattr(deployment, attr, value)
            changed.append(attr)
    return changed


def _check_provider_model(provider_model: str) -> None:
    # Imported here: routing loads litellm (seconds), which commands and workers that
    # never write a deployment should not pay for.
    from gateway.routing import provider_model_problem

    problem = provider_model_problem(provider_model)
    if problem:
        raise invalid_request(problem, param="provider_model")


def deployment_create(
    *, name: str, provider_model: str, actor: str = "system", **fields: Unpack[DeploymentFields]
) -> ModelDeployment:
    _check_provider_model(provider_model)
    deployment = ModelDeployment(name=name, provider_model=provider_model)
    _apply_deployment_fields(deployment, fields)
    deployment.full_clean()
    with transaction.atomic():
        deployment.save()
        config_version_bump()
        audit(actor=actor, action="create", obj=deployment, before=None)
    return deployment


def deployment_update(
    *, deployment: ModelDeployment, actor: str = "system", **fields: Unpack[DeploymentChanges]
) -> ModelDeployment:
    if "provider_model" in fields:
        _check_provider_model(fields["provider_model"])
    before = snapshot(deployment)
    changed = _apply_deployment_fields(deployment, fields)
    deployment.full_clean()
    with transaction.atomic():
        deployment.save(update_fields=[*changed, "updated_at"])
        config_version_bump()
        audit(actor=actor, action="update", obj=deployment, before=before)
    return deployment


def deployment_delete(*, deployment: ModelDeployment, actor: str = "system") -> None:
    before, pk = snapshot(deployment), deployment.pk
    with transaction.atomic():
        deployment.delete()
        config_version_bump()
        deployment.pk = pk
        audit(actor=actor, action="delete", obj=deployment, before=before)


def money_to_micro(value: Decimal | None) -> int | None:
    """USD Decimal → integer micro-USD (budgets are whole micro-dollars)."""
    if value is None:
        return None
    return int((value * 1_000_000).to_integral_value())


# --- model groups and aliases -------------------------------------------------------------


FALLBACK_FIELDS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")


def fallback_problem(
    *, model: str, field: str, names: Iterable[str], known: set[str]
) -> str | None:
    """Why `names` may not be the `field` list of `model`'s routing policy, or None.

    A fallback must be a configured model (a deployment name or an alias), never the
    model itself.
    """
    for name in names:
        if name == model:
            return f"A model cannot fall back to itself ('{name}')."
        if name not in known:
            return f"'{name}' in {field} is not a configured model; add it first."
    return None


def group_save(*, name: str, actor: str = "system", **fields: Unpack[GroupFields]) -> ModelGroup:
    """Create or update the routing policy of the public model `name`."""
    lists: dict[str, list[str]] = {
        "fallbacks": fields.get("fallbacks") or [],
        "context_window_fallbacks": fields.get("context_window_fallbacks") or [],
        "content_policy_fallbacks": fields.get("content_policy_fallbacks") or [],
    }
    if any(lists.values()):
        known = set(model_names())
        for field in FALLBACK_FIELDS:
            problem = fallback_problem(model=name, field=field, names=lists[field], known=known)
            if problem:
                raise invalid_request(problem, param=field)
    with transaction.atomic():
        found = ModelGroup.objects.select_for_update().filter(name=name).first()
        group = found or ModelGroup(name=name)
        before = snapshot(found)
        for attr, value in fields.items():
            setattr(group, attr, value)
        group.full_clean()
        group.save()
        config_version_bump()
        audit(actor=actor, action="update" if found else "create", obj=group, before=before)
    return group


def group_delete(*, group: ModelGroup, actor: str = "system") -> None:
    before, pk = snapshot(group), group.pk
    with transaction.atomic():
        group.delete()
        config_version_bump()
        group.pk = pk
        audit(actor=actor, action="delete", obj=group, before=before)


def alias_create(*, alias: str, target: str, actor: str = "system") -> ModelAlias:
    if not ModelDeployment.objects.filter(name=target).exists():
        raise invalid_request(f"'{target}' is not a configured model.", param="target")
    if alias == target:
        raise invalid_request("An alias cannot point at itself.", param="target")
    if ModelAlias.objects.filter(alias=alias).exists():
        raise GatewayError(
            f"The alias '{alias}' already exists.", 409, code="conflict", param="alias"
        )
    if ModelDeployment.objects.filter(name=alias).exists():
        raise GatewayError(
            f"'{alias}' is already the name of a model; an alias must be a new name.",
            409,
            code="conflict",
            param="alias",
        )
    with transaction.atomic():
        created = ModelAlias.objects.create(alias=alias, target=target)
        config_version_bump()
        audit(actor=actor, action="create", obj=created, before=None)
    return created


def alias_delete(*, alias: ModelAlias, actor: str = "system") -> None:
    before, pk = snapshot(alias), alias.pk
    with transaction.atomic():
        alias.delete()
        config_version_bump()
        alias.pk = pk
        audit(actor=actor, action="delete", obj=alias, before=before)
