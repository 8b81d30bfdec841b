"""Writing the ledger. Append-only and idempotent per (request id, attempt)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count, Max, Q

from billing.models import LedgerEntry, LedgerStatus
from billing.pricing import Usage


@dataclass
class AttemptRecord:
    request_id: str
    attempt: int
    team_id: int
    key_id: int | None
    endpoint: str
    model: str
    status: str
    started_at: datetime
    ended_at: datetime
    usage: Usage = field(default_factory=Usage)
    usage_estimated: bool = False
    list_cost_micro_usd: int = 0
    charged_cost_micro_usd: int = 0
    deployment_id: str = ""
    provider: str = ""
    provider_model: str = ""
    http_status: int | None = None
    error_type: str = ""
    cache_hit: bool = False
    is_batch: bool = False
    stream: bool = False
    latency_ms: int = 0
    ttft_ms: int | None = None
    end_user: str = ""
    tags: list[str] = field(default_factory=list)

    def to_model(self) -> LedgerEntry:
        if self.status not in LedgerStatus.values:
            raise ValueError(f"unknown ledger status {self.status!r}")
        return LedgerEntry(
            request_id=self.request_id,
            attempt=self.attempt,
            team_id=self.team_id,
            key_id=self.key_id,
            endpoint=self.endpoint,
            model=self.model,
            deployment_id=self.deployment_id,
            provider=self.provider,
            provider_model=self.provider_model,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
            cached_read_tokens=self.usage.cached_read_tokens,
            cache_write_tokens=self.usage.cache_write_tokens,
            reasoning_tokens=self.usage.reasoning_tokens,
            usage_estimated=self.usage_estimated,
            list_cost_micro_usd=self.list_cost_micro_usd,
            charged_cost_micro_usd=self.charged_cost_micro_usd,
            status=self.status,
            http_status=self.http_status,
            error_type=self.error_type[:64],
            cache_hit=self.cache_hit,
            is_batch=self.is_batch,
            stream=self.stream,
            latency_ms=max(0, self.latency_ms),
            ttft_ms=self.ttft_ms,
            started_at=self.started_at,
            ended_at=self.ended_at,
            end_user=self.end_user[:256],
            tags=self.tags,
        )


def ledger_write(records: list[AttemptRecord]) -> None:
    """Insert the rows; a row whose (request_id, attempt) exists already is skipped.

    Skipping (rather than failing) is what makes a retried write after a timeout or
    a redelivered task harmless: the unique constraint decides, not hope.
    """
    LedgerEntry.objects.bulk_create([r.to_model() for r in records], ignore_conflicts=True)


def attempts_so_far(request_id: str) -> tuple[int, bool]:
    """A request's last attempt number in the ledger, and whether one was answered.

    A batch line that runs again numbers its attempts on from here, so its provider
    calls never reuse a (request_id, attempt) that the ledger would drop.
    """
    found = LedgerEntry.objects.filter(request_id=request_id).aggregate(
        last=Max("attempt"), answered=Count("id", filter=Q(status=LedgerStatus.SUCCESS))
    )
    return found["last"] or 0, bool(found["answered"])
