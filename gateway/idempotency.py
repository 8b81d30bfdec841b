"""Client `Idempotency-Key`s: a repeat within 24 h replays the first result.

The first request with a key claims it (SET NX) and runs; concurrent repeats wait
for it to finish and replay its response, so however many copies arrive at once
the provider is called once and the ledger gets one row. The same key with a
different body is a client bug and gets 409. A request that fails gives its key
back, so the client can retry it.

Keys are scoped to the virtual key that sent them and stored in Redis (in the
process on the embedded default). If Redis cannot be reached, a request carrying
an idempotency key is refused with 503 rather than risk running twice.

Each team's share of the store is capped in entries and bytes
(GATEWAY_IDEMPOTENCY_MAX_*_PER_TEAM): a flood of new keys evicts that team's own
oldest keys (whose repeats would then run again), never another team's. A result
larger than the byte cap is not kept: its key is given back, as after a failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings

from core import redis_client
from core.capped_store import STORED, Caps, capped_store
from core.errors import GatewayError, invalid_request

TTL_SECONDS = 24 * 3600
# How long a claim may stay "running" before another request may take it over
# (the first one died without finishing).
PENDING_TTL_SECONDS = 900
POLL_SECONDS = 0.05


@dataclass
class Stored:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    events: list[bytes] = field(default_factory=list)
    stream: bool = False


@dataclass
class Claim:
    team_id: int
    storage_key: str
    fingerprint: str
    replay: Stored | None = None


def _unavailable() -> GatewayError:
    return GatewayError(
        "Idempotency keys cannot be checked right now (Redis did not answer); retry shortly.",
        503,
        "server_error",
        "idempotency_unavailable",
        headers={"retry-after": "1"},
    )


def _conflict() -> GatewayError:
    return GatewayError(
        "This Idempotency-Key was already used with a different request body. "
        "Use a new key for a different request.",
        409,
        "invalid_request_error",
        "idempotency_key_reused",
    )


def _encode(fingerprint: str, stored: Stored | None) -> bytes:
    if stored is None:
        return orjson.dumps({"fp": fingerprint, "state": "pending"})
    return orjson.dumps(
        {
            "fp": fingerprint,
            "state": "done",
            "status": stored.status,
            "headers": stored.headers,
            "stream": stored.stream,
            "body": base64.b64encode(stored.body).decode(),
            "events": [base64.b64encode(e).decode() for e in stored.events],
        }
    )


def _decode(raw: bytes) -> tuple[str, Stored | None]:
    data = orjson.loads(raw)
    if data.get("state") != "done":
        return data["fp"], None
    return data["fp"], Stored(
        status=int(data["status"]),
        headers=dict(data["headers"]),
        body=base64.b64decode(data["body"]),
        events=[base64.b64decode(e) for e in data["events"]],
        stream=bool(data["stream"]),
    )


_backend = capped_store("gw:idem", redis_client.client)


def _caps() -> Caps:
    return Caps(
        settings.GATEWAY_IDEMPOTENCY_MAX_ENTRIES_PER_TEAM,
        settings.GATEWAY_IDEMPOTENCY_MAX_BYTES_PER_TEAM,
    )


def header_value(raw: str | None) -> str | None:
    if raw is None:
        return None
    value = raw.strip()
    if not value or len(value) > 255:
        raise invalid_request(
            "Idempotency-Key must be 1 to 255 characters.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return value


def fingerprint(body: dict[str, Any]) -> str:
    # Key order differs between clients; the same request is the same JSON value.
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def claim(
    team_id: int, key_id: int, idempotency_key: str, body_fingerprint: str, wait_seconds: float
) -> Claim:
    """Claim the key, or wait for whoever holds it and return its stored result."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    storage_key = f"gw:idem:{key_id}:{digest}"
    store = _backend()
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            taken = await store.set(
                team_id,
                storage_key,
                _encode(body_fingerprint, None),
                PENDING_TTL_SECONDS,
                _caps(),
                nx=True,
            )
            if taken == STORED:
                return Claim(team_id, storage_key, body_fingerprint)
            raw = await store.get(team_id, storage_key)
            if raw is None:
                continue  # released between our two calls: try to claim again
            stored_fp, stored = _decode(raw)
            if stored_fp != body_fingerprint:
                raise _conflict()
            if stored is not None:
                return Claim(team_id, storage_key, body_fingerprint, replay=stored)
            if time.monotonic() >= deadline:
                raise GatewayError(
                    "A request with this Idempotency-Key is still running; "
                    "retry after it completes.",
                    409,
                    "invalid_request_error",
                    "idempotency_key_in_progress",
                    headers={"retry-after": "1"},
                )
            await asyncio.sleep(POLL_SECONDS)
    except redis_client.RedisUnavailable:
        raise _unavailable() from None


async def complete(claim: Claim, stored: Stored) -> None:
    try:
        kept = await _backend().set(
            claim.team_id,
            claim.storage_key,
            _encode(claim.fingerprint, stored),
            TTL_SECONDS,
            _caps(),
        )
    except redis_client.RedisUnavailable:
        kept = None
    if kept != STORED:
        # The response already went out and is billed; a later repeat would run
        # again, which is the best that can be done without the store (or for a
        # result too large to keep, which the store already dropped).
        await release(claim)


async def release(claim: Claim) -> None:
    # If the store is unreachable, the pending claim expires by itself after
    # PENDING_TTL_SECONDS.
    with contextlib.suppress(redis_client.RedisUnavailable):
        await _backend().delete(claim.team_id, claim.storage_key)


REPLAYED_HEADERS = (
    "x-gateway-cost-usd",
    "x-gateway-model",
    "x-gateway-attempts",
    "x-gateway-request-id",
    "content-type",
)
