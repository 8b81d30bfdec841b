"""The request log: the ledger a page at a time, on its indexes, and one request's attempts."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Q

from accounts.models import Team, VirtualKey
from billing.models import LedgerEntry
from dashboard.access import Viewer
from dashboard.selectors.usage import LedgerScope, ledger


@dataclass
class LogPage:
    rows: list[LedgerEntry]
    next_cursor: str
    key_names: dict[int, str] = field(default_factory=dict)
    team_names: dict[int, str] = field(default_factory=dict)

    @property
    def entries(self) -> list[tuple[LedgerEntry, str, str]]:
        return [
            (
                row,
                self.key_names.get(row.key_id, "") if row.key_id is not None else "",
                self.team_names.get(row.team_id, ""),
            )
            for row in self.rows
        ]


def encode_cursor(row: LedgerEntry) -> str:
    raw = f"{row.started_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, ident = raw.partition("|")
        return datetime.fromisoformat(stamp), int(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def request_log(scope: LedgerScope, *, cursor: str = "", limit: int = 50) -> LogPage:
    """Newest first, keyset-paginated: a page costs the same on row 50 as on row 500,000."""
    rows = ledger(scope)
    position = decode_cursor(cursor) if cursor else None
    if position is not None:
        stamp, ident = position
        rows = rows.filter(Q(started_at__lt=stamp) | Q(started_at=stamp, id__lt=ident))
    page = list(rows.order_by("-started_at", "-id")[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    key_ids = {r.key_id for r in page if r.key_id is not None}
    team_ids = {r.team_id for r in page}
    return LogPage(
        rows=page,
        next_cursor=encode_cursor(page[-1]) if more else "",
        key_names=dict(VirtualKey.objects.filter(id__in=key_ids).values_list("id", "name"))
        if key_ids
        else {},
        team_names=dict(Team.objects.filter(id__in=team_ids).values_list("id", "name"))
        if team_ids
        else {},
    )


def ledger_row(viewer: Viewer, row_id: int) -> LedgerEntry | None:
    rows = LedgerEntry.objects.filter(id=row_id)
    scope = viewer.ledger_q()
    if scope is not None:
        rows = rows.filter(scope)
    return rows.first()


def request_attempts(row: LedgerEntry, viewer: Viewer) -> list[LedgerEntry]:
    """Every attempt (retries, fallbacks) of the same client request."""
    rows = LedgerEntry.objects.filter(request_id=row.request_id)
    scope = viewer.ledger_q()
    if scope is not None:
        rows = rows.filter(scope)
    return list(rows.order_by("attempt")[:20])
