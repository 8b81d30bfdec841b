"""The audit log page: entries the viewer may read, and what each changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet

from core.models import AuditEntry
from dashboard.access import Viewer


@dataclass(frozen=True)
class AuditFilter:
    object_type: str = ""
    team_id: int | None = None
    actor: str = ""


@dataclass(frozen=True)
class Change:
    field: str
    before: Any
    after: Any


def audit_entries(viewer: Viewer, filters: AuditFilter) -> QuerySet[AuditEntry]:
    entries = AuditEntry.objects.all()
    scope = viewer.audit_q()
    if scope is not None:
        entries = entries.filter(scope)
    if filters.object_type:
        entries = entries.filter(object_type=filters.object_type)
    if filters.team_id is not None:
        entries = entries.filter(team_id=filters.team_id)
    if filters.actor:
        entries = entries.filter(actor=filters.actor)
    return entries.order_by("-created_at", "-id")


# Timestamps the entry's own time already says (computed_at: an invoice's last recompute).
_NOISE = {"updated_at", "created_at", "computed_at"}


def audit_changes(entry: AuditEntry) -> list[Change]:
    before: dict[str, Any] = entry.before or {}
    after: dict[str, Any] = entry.after or {}
    fields = [f for f in dict.fromkeys([*before, *after]) if f not in _NOISE]
    if entry.action in ("create", "delete"):
        # A summary of what was there: the fields that hold something.
        values = after if entry.action == "create" else before
        return [
            Change(f, before.get(f), after.get(f))
            for f in fields
            if values.get(f) not in (None, "", [], {}, False) and f != "id"
        ]
    return [Change(f, before.get(f), after.get(f)) for f in fields if before.get(f) != after.get(f)]
