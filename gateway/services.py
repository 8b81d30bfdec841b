"""Writes to the data plane's tables: teams, keys and model deployments.

Every change goes through a function here (never `.save()` at the edges), so that
bumping the configuration version, caches and, later, the audit log happen in one
place.
"""

from __future__ import annotations

import secrets as _secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from gateway.crypto import encrypt_secret, hash_key_secret, new_key_secret
from gateway.errors import GatewayError, invalid_request
from gateway.models import (
    ConfigVersion,
    KeySecret,
    ModelAlias,
    ModelDeployment,
    ModelGroup,
    Team,
    VirtualKey,
)


def config_version_bump() -> str:
    token = _secrets.token_hex(16)
    updated = ConfigVersion.objects.filter(singleton=True).update(token=token)
    if not updated:
        ConfigVersion.objects.get_or_create(singleton=True, defaults={"token": token})
    return token


# --- Teams ----------------------------------------------------------------------


def team_create(*, name: str, **fields: Any) -> Team:
    if Team.objects.filter(name=name).exists():
        raise GatewayError(
            f"A team named {name!r} already exists.", 409, code="conflict", param="name"
        )
    team = Team(name=name, **fields)
    team.full_clean()
    team.save()
    return team


def team_update(*, team: Team, **fields: Any) -> Team:
    name = fields.get("name")
    if name and Team.objects.filter(name=name).exclude(id=team.id).exists():
        raise GatewayError(
            f"A team named {name!r} already exists.", 409, code="conflict", param="name"
        )
    for attr, value in fields.items():
        setattr(team, attr, value)
    team.full_clean()
    team.save(update_fields=[*fields.keys(), "updated_at"])
    return team


def team_delete(*, team: Team) -> None:
    if team.keys.filter(revoked_at__isnull=True).exists():
        raise GatewayError(
            "The team still has active keys; revoke them before deleting the team.",
            409,
            code="conflict",
        )
    with transaction.atomic():
        # Revoked keys keep their history in the ledger; remove their secrets first.
        KeySecret.objects.filter(key__team=team).delete()
        VirtualKey.objects.filter(team=team).delete()
        team.delete()


# --- Virtual keys -------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedKey:
    key: VirtualKey
    secret: str


def _add_secret(key: VirtualKey) -> str:
    secret = new_key_secret()
    KeySecret.objects.create(key=key, secret_hash=hash_key_secret(secret), last4=secret[-4:])
    return secret


def key_create(*, team: Team, name: str, **fields: Any) -> IssuedKey:
    with transaction.atomic():
        key = VirtualKey(team=team, name=name, **fields)
        key.full_clean()
        key.save()
        secret = _add_secret(key)
    return IssuedKey(key=key, secret=secret)


def key_update(*, key: VirtualKey, **fields: Any) -> VirtualKey:
    for attr, value in fields.items():
        setattr(key, attr, value)
    key.full_clean()
    key.save(update_fields=[*fields.keys(), "updated_at"])
    return key


def key_revoke(*, key: VirtualKey) -> VirtualKey:
    # Compare-and-set so two concurrent revokes record one revocation time.
    VirtualKey.objects.filter(id=key.id, revoked_at__isnull=True).update(
        revoked_at=timezone.now(), updated_at=timezone.now()
    )
    key.refresh_from_db()
    return key


def key_rotate(*, key: VirtualKey, grace_seconds: int = 0) -> IssuedKey:
    if key.revoked_at is not None:
        raise invalid_request("A revoked key cannot be rotated; issue a new key instead.")
    if grace_seconds < 0:
        raise invalid_request(
            "grace_period_seconds must be 0 or more.", param="grace_period_seconds"
        )
    now = timezone.now()
    with transaction.atomic():
        locked = VirtualKey.objects.select_for_update().get(id=key.id)
        old_expiry: datetime = now + timedelta(seconds=grace_seconds)
        # Secrets already expiring sooner keep their earlier expiry.
        KeySecret.objects.filter(key=locked, expires_at__isnull=True).update(expires_at=old_expiry)
        KeySecret.objects.filter(key=locked, expires_at__gt=old_expiry).update(
            expires_at=old_expiry
        )
        secret = _add_secret(locked)
        locked.save(update_fields=["updated_at"])
    return IssuedKey(key=locked, secret=secret)


# --- Model deployments ----------------------------------------------------------------


def _apply_deployment_fields(deployment: ModelDeployment, fields: dict[str, Any]) -> list[str]:
    changed = []
    for attr, value in fields.items():
        if attr == "api_key":
            deployment.api_key_encrypted = encrypt_secret(value or "")
            changed.append("api_key_encrypted")
        else:
            setattr(deployment, attr, value)
            changed.append(attr)
    return changed


def deployment_create(*, name: str, provider_model: str, **fields: Any) -> ModelDeployment:
    deployment = ModelDeployment(name=name, provider_model=provider_model)
    _apply_deployment_fields(deployment, fields)
    deployment.full_clean()
    with transaction.atomic():
        deployment.save()
        config_version_bump()
    return deployment


def deployment_update(*, deployment: ModelDeployment, **fields: Any) -> ModelDeployment:
    changed = _apply_deployment_fields(deployment, fields)
    deployment.full_clean()
    with transaction.atomic():
        deployment.save(update_fields=[*changed, "updated_at"])
        config_version_bump()
    return deployment


def deployment_delete(*, deployment: ModelDeployment) -> None:
    with transaction.atomic():
        deployment.delete()
        config_version_bump()


def money_to_micro(value: Decimal | None) -> int | None:
    """USD Decimal → integer micro-USD (budgets are whole micro-dollars)."""
    if value is None:
        return None
    return int((value * 1_000_000).to_integral_value())


# --- model groups and aliases -------------------------------------------------------------


def group_save(*, name: str, **fields: Any) -> ModelGroup:
    """Create or update the routing policy of the public model `name`."""
    for list_field in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
        if name in (fields.get(list_field) or []):
            raise invalid_request(f"A model cannot fall back to itself ('{name}').", param=list_field)
    with transaction.atomic():
        group = ModelGroup.objects.select_for_update().filter(name=name).first() or ModelGroup(name=name)
        for attr, value in fields.items():
            setattr(group, attr, value)
        group.full_clean()
        group.save()
        config_version_bump()
    return group


def group_delete(*, group: ModelGroup) -> None:
    with transaction.atomic():
        group.delete()
        config_version_bump()


def alias_create(*, alias: str, target: str) -> ModelAlias:
    if alias == target:
        raise invalid_request("An alias cannot point at itself.", param="target")
    if ModelAlias.objects.filter(alias=alias).exists():
        raise GatewayError(f"The alias '{alias}' already exists.", 409, code="conflict", param="alias")
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
    return created


def alias_delete(*, alias: ModelAlias) -> None:
    with transaction.atomic():
        alias.delete()
        config_version_bump()
