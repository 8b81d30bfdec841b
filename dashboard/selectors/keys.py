"""The keys pages: keys with their hints, last use and spend this period."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db.models import OuterRef, QuerySet, Subquery

from accounts.models import KeySecret, VirtualKey
from billing.models import LedgerEntry
from billing.selectors import period_spends
from dashboard.access import Viewer


def key_period_spend(keys: Sequence[VirtualKey], now: datetime | None = None) -> dict[int, int]:
    """Each key's spend in its own current budget period (team timezone)."""
    owners = ((key.id, key.budget_period, key.team.timezone, key.created_at) for key in keys)
    return period_spends("key_id", owners, now)


@dataclass(frozen=True)
class KeyFilter:
    team_id: int | None = None
    status: str = "active"  # active | revoked | all
    search: str = ""


def keys_for(viewer: Viewer, filters: KeyFilter) -> QuerySet[VirtualKey]:
    """Keys with their newest secret's last 4 characters and last use, in one query."""
    keys = VirtualKey.objects.select_related("team", "owner")
    scope = viewer.keys_q()
    if scope is not None:
        keys = keys.filter(scope)
    if filters.team_id is not None:
        keys = keys.filter(team_id=filters.team_id)
    if filters.status == "active":
        keys = keys.filter(revoked_at__isnull=True)
    elif filters.status == "revoked":
        keys = keys.filter(revoked_at__isnull=False)
    if filters.search:
        keys = keys.filter(name__icontains=filters.search)
    return with_key_hints(keys).order_by("-created_at", "-id")


def with_key_hints(keys: QuerySet[VirtualKey]) -> QuerySet[VirtualKey]:
    newest_secret = KeySecret.objects.filter(key_id=OuterRef("pk")).order_by("-created_at", "-id")
    # The latest ledger row of the key, found by a backward scan of (key_id, started_at).
    last_row = LedgerEntry.objects.filter(key_id=OuterRef("pk")).order_by("-started_at")
    return keys.annotate(
        last4=Subquery(newest_secret.values("last4")[:1]),
        last_used_at=Subquery(last_row.values("started_at")[:1]),
    )


@dataclass(frozen=True)
class KeyRow:
    key: VirtualKey
    spent_micro_usd: int

    @property
    def percent(self) -> float | None:
        limit = self.key.max_budget_micro_usd
        return 100 * self.spent_micro_usd / limit if limit else None


def key_rows(keys: Sequence[VirtualKey]) -> list[KeyRow]:
    spent = key_period_spend(keys)
    return [KeyRow(key, spent.get(key.id, 0)) for key in keys]


KEY_OPTIONS_LIMIT = 200


def key_options(viewer: Viewer, team_id: int | None) -> list[tuple[int, str]]:
    """Keys to pick in a filter: the viewer's, newest first, at most KEY_OPTIONS_LIMIT."""
    keys = VirtualKey.objects.select_related("team").only("id", "name", "team__name")
    scope = viewer.keys_q()
    if scope is not None:
        keys = keys.filter(scope)
    if team_id is not None:
        keys = keys.filter(team_id=team_id)
    return [
        (k.id, f"{k.name} · {k.team.name}")
        for k in keys.order_by("-created_at", "-id")[:KEY_OPTIONS_LIMIT]
    ]


def key_secrets(key: VirtualKey) -> list[KeySecret]:
    """The key's secrets (hint and expiry only; the hashes are never shown)."""
    return list(key.secrets.only("id", "key_id", "last4", "expires_at", "created_at")[:20])
