"""One request on its way through the gateway (`Call`), what the flow answers (`Result`),
and its ledger rows: the state the flow (gateway.flow) and the stream relay
(gateway.relay) share.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from accounts.auth import KeyPrincipal
from billing import recorder
from billing.ledger import AttemptRecord
from billing.pricing import Usage
from gateway import idempotency, response_cache
from gateway.dialects import Endpoint
from gateway.routing import Deployment


@dataclass
class Call:
    """One client request on its way through the gateway."""

    request_id: str
    endpoint: Endpoint
    principal: KeyPrincipal
    model: str
    body: dict[str, Any]
    stream: bool
    started_at: datetime
    started_mono: float
    headers: dict[str, str]
    end_user: str = ""
    tags: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    # Of prompt_tokens: the context a `previous_response_id` carries in.
    carried_tokens: int = 0
    attempts: int = 0
    charged_micro_usd: int = 0
    claim: idempotency.Claim | None = None
    cache_key: response_cache.CacheKey | None = None
    # A line of a Batch API job (billed at the batch discount by its caller).
    is_batch: bool = False


@dataclass(slots=True)
class Result:
    """What the flow answers, with no HTTP in it: the HTTP edge (gateway.http) turns it
    into a response, a batch line (gateway.batch_runner) into its output.

    Exactly one of `body` (a JSON answer) and `events` (a stream's SSE events) is the
    answer; `data` is the JSON answer already parsed, when a provider gave it.
    """

    headers: dict[str, str]
    content_type: str | None = None
    body: bytes = b""
    data: dict[str, Any] | None = None
    events: AsyncIterator[bytes] | None = None
    status: int = 200


# --- ledger rows -----------------------------------------------------------------------------


def attempt_row(
    call: Call,
    deployment: Deployment | None,
    *,
    status: str,
    usage: Usage | None,
    estimated: bool = False,
    http_status: int | None = None,
    error_type: str = "",
    ttft_ms: int | None = None,
    cache_hit: bool = False,
) -> AttemptRecord:
    """The row of the call's current attempt; `record` prices and writes it."""
    return AttemptRecord(
        request_id=call.request_id,
        attempt=call.attempts,
        team_id=call.principal.team_id,
        key_id=call.principal.key_id,
        endpoint=call.endpoint.name,
        model=call.model,
        status=status,
        started_at=call.started_at,
        ended_at=timezone.now(),
        usage=usage or Usage(),
        usage_estimated=estimated,
        deployment_id=deployment.id if deployment else "",
        provider=deployment.provider if deployment else "",
        provider_model=deployment.provider_model if deployment else "",
        http_status=http_status,
        error_type=error_type,
        cache_hit=cache_hit,
        is_batch=call.is_batch,
        stream=call.stream,
        latency_ms=int((time.monotonic() - call.started_mono) * 1000),
        ttft_ms=ttft_ms,
        end_user=call.end_user,
        tags=call.tags,
    )


async def record(call: Call, deployment: Deployment | None, row: AttemptRecord) -> None:
    """The attempt's ledger row, priced and written by billing (billing.recorder)."""
    call.charged_micro_usd += await recorder.record(
        row,
        prices=deployment.prices if deployment else None,
        markup_percent=call.principal.markup_percent,
    )
