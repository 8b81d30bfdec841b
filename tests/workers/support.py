"""Helpers for the worker tests: ledger rows written as the data plane writes them."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone

from billing.ledger import AttemptRecord, ledger_write
from billing.models import LedgerEntry
from billing.pricing import Usage


def ledger_row(
    *,
    team_id: int,
    started_at: datetime,
    key_id: int | None = 1,
    model: str = "m-a",
    provider: str = "openai",
    deployment_id: str = "dep-1",
    status: str = "success",
    tags: list[str] | None = None,
    charged: int | None = None,
    list_cost: int | None = None,
    usage: Usage | None = None,
    **extra: Any,
) -> AttemptRecord:
    usage = usage or Usage(
        prompt_tokens=random.randint(1, 5000), completion_tokens=random.randint(0, 900)
    )
    list_cost = random.randint(0, 50_000) if list_cost is None else list_cost
    return AttemptRecord(
        request_id=f"req_{uuid.uuid4().hex}",
        attempt=1,
        team_id=team_id,
        key_id=key_id,
        endpoint="chat.completions",
        model=model,
        status=status,
        started_at=started_at,
        ended_at=started_at + timedelta(seconds=1),
        usage=usage,
        list_cost_micro_usd=list_cost,
        charged_cost_micro_usd=list_cost * 11 // 10 if charged is None else charged,
        deployment_id=deployment_id,
        provider=provider,
        tags=tags or [],
        **extra,
    )


def write(records: list[AttemptRecord], *, age: timedelta | None = None) -> list[AttemptRecord]:
    """Insert rows as the data plane does; `age` backdates when they were recorded."""
    ledger_write(records)
    if age is not None:
        LedgerEntry.objects.filter(request_id__in=[r.request_id for r in records]).update(
            created_at=timezone.now() - age
        )
    return records
