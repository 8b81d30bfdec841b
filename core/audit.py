"""The audit log: who changed what, with the values before and after, never secrets."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.forms.models import model_to_dict

from core.models import AuditEntry

# Never copied into an audit snapshot: each becomes a flag saying whether one is set.
# (A Fernet token is as good as the secret to anyone who can read SECRET_KEY.)
_SECRET_FIELDS = {
    "api_key_encrypted": "has_api_key",  # gateway.ModelDeployment
    "secret_encrypted": "has_secret",  # billing.WebhookEndpoint
}


def snapshot(obj: models.Model | None) -> dict[str, Any] | None:
    """A JSON-safe copy of an object's fields for the audit log, without secrets."""
    if obj is None:
        return None
    data = model_to_dict(obj)
    for secret, flag in _SECRET_FIELDS.items():
        if secret in data:
            data[flag] = bool(data.pop(secret))
    return {
        k: (v if isinstance(v, str | int | float | bool | list | dict | type(None)) else str(v))
        for k, v in data.items()
    }


def audit(
    *,
    actor: str,
    action: str,
    obj: models.Model,
    before: dict[str, Any] | None,
    team_id: int | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Record a change; `after` defaults to a snapshot of `obj` (none for a delete)."""
    AuditEntry.objects.create(
        actor=actor[:200],
        action=action,
        object_type=obj._meta.model_name or type(obj).__name__.lower(),
        object_id=str(obj.pk),
        team_id=team_id,
        before=before,
        after=after if after is not None else None if action == "delete" else snapshot(obj),
    )
