"""Virtual-key authentication for the data plane.

The lookup is cached per process for GATEWAY_KEY_CACHE_SECONDS, so a busy key costs
one indexed query per process per interval, and a revocation reaches every process
within that interval.

Unknown secrets go to a separate negative cache, bounded in entries
(GATEWAY_KEY_NEGATIVE_CACHE_ENTRIES, oldest dropped first) and short-lived
(GATEWAY_KEY_NEGATIVE_CACHE_SECONDS, so a key issued after a miss works within it):
repeating a bad key costs no query, and a flood of distinct bad keys can neither
grow memory nor push the known keys out. Concurrent lookups of one secret share a
single query.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db.models import F
from django.http import HttpRequest
from django.utils import timezone

from accounts.models import KeySecret
from core import errors
from core.crypto import hash_key_secret
from core.db import run_db
from core.errors import GatewayError


@dataclass(frozen=True, slots=True)
class KeyPrincipal:
    """Everything the hot path needs to know about a caller, in one cached object."""

    key_id: int
    key_public_id: str
    key_name: str
    team_id: int
    team_name: str
    allowed_models: frozenset[str]  # empty: every model
    key_expires_at: datetime | None
    secret_expires_at: datetime | None
    revoked: bool
    key_budget_micro_usd: int | None
    key_budget_period: str
    key_rpm_limit: int | None
    key_tpm_limit: int | None
    team_budget_micro_usd: int | None
    team_budget_period: str
    team_timezone: str
    team_rpm_limit: int | None
    team_tpm_limit: int | None
    markup_percent: Decimal
    alert_thresholds: tuple[int, ...]
    cache_ttl_seconds: int | None
    # The dashboard user the key belongs to (None for keys of the management API).
    owner_id: int | None = None
    # The owner is deactivated (SCIM); the key works again on reactivation.
    suspended: bool = False

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


# Known keys only: bounded by the keys that exist, and the oldest loaded goes first.
_MAX_ENTRIES = 50_000
_cache: OrderedDict[str, tuple[KeyPrincipal, float]] = OrderedDict()
# Secret hash → when it was found unknown (monotonic), oldest first.
_unknown: OrderedDict[str, float] = OrderedDict()
# Lookups under way, so a burst of one secret makes one query.
_inflight: dict[str, asyncio.Task[KeyPrincipal | None]] = {}


def _load(secret_hash: str) -> KeyPrincipal | None:
    row = (
        KeySecret.objects.select_related("key", "key__team").filter(secret_hash=secret_hash).first()
    )
    if row is None:
        return None
    key, team = row.key, row.key.team
    return KeyPrincipal(
        key_id=key.id,
        key_public_id=str(key.public_id),
        key_name=key.name,
        team_id=team.id,
        team_name=team.name,
        allowed_models=frozenset(key.allowed_models or ()),
        key_expires_at=key.expires_at,
        secret_expires_at=row.expires_at,
        revoked=key.revoked_at is not None,
        key_budget_micro_usd=key.max_budget_micro_usd,
        key_budget_period=key.budget_period,
        key_rpm_limit=key.rpm_limit,
        key_tpm_limit=key.tpm_limit,
        team_budget_micro_usd=team.budget_micro_usd,
        team_budget_period=team.budget_period,
        team_timezone=team.timezone,
        team_rpm_limit=team.rpm_limit,
        team_tpm_limit=team.tpm_limit,
        markup_percent=team.markup_percent,
        alert_thresholds=tuple(int(t) for t in team.alert_thresholds or ()),
        cache_ttl_seconds=key.cache_ttl_seconds or team.cache_ttl_seconds,
        owner_id=key.owner_id,
        suspended=key.suspended_at is not None,
    )


def principal_for_key(key_id: int) -> KeyPrincipal | None:
    """The key as auth sees it, found by id (a batch worker has no secret to present)."""
    # The key's current secret (the one without an expiry first) identifies it.
    secret = (
        KeySecret.objects.filter(key_id=key_id)
        .order_by(F("expires_at").desc(nulls_first=True), "-created_at")
        .first()
    )
    return _load(secret.secret_hash) if secret is not None else None


async def _principal(secret_hash: str) -> KeyPrincipal | None:
    now_mono = time.monotonic()
    cached = _cache.get(secret_hash)
    if cached is not None and now_mono - cached[1] < settings.GATEWAY_KEY_CACHE_SECONDS:
        return cached[0]
    missed = _unknown.get(secret_hash)
    if missed is not None and now_mono - missed < settings.GATEWAY_KEY_NEGATIVE_CACHE_SECONDS:
        return None
    lookup = _inflight.get(secret_hash)
    if lookup is None or lookup.get_loop() is not asyncio.get_running_loop():
        lookup = asyncio.get_running_loop().create_task(_lookup(secret_hash))
        # Read the outcome even if every waiter left, so a failure is not reported as lost.
        lookup.add_done_callback(lambda task: task.cancelled() or task.exception())
        _inflight[secret_hash] = lookup
    # Shielded: a client that hangs up must not cancel the query the others wait on.
    return await asyncio.shield(lookup)


async def _lookup(secret_hash: str) -> KeyPrincipal | None:
    try:
        principal = await run_db(_load, secret_hash)
    except Exception as exc:  # Postgres down or its pool exhausted: fail fast and say so
        raise database_unavailable() from exc
    finally:
        _inflight.pop(secret_hash, None)
    now_mono = time.monotonic()
    if principal is None:
        _cache.pop(secret_hash, None)
        _unknown[secret_hash] = now_mono
        _unknown.move_to_end(secret_hash)
        while len(_unknown) > settings.GATEWAY_KEY_NEGATIVE_CACHE_ENTRIES:
            _unknown.popitem(last=False)
    else:
        _unknown.pop(secret_hash, None)
        _cache[secret_hash] = (principal, now_mono)
        _cache.move_to_end(secret_hash)
        while len(_cache) > _MAX_ENTRIES:
            _cache.popitem(last=False)
    return principal


def database_unavailable() -> GatewayError:
    return GatewayError(
        "The gateway cannot reach its database to check this key; retry shortly.",
        503,
        "server_error",
        "database_unavailable",
        headers={"retry-after": "2"},
    )


def secret_from_request(request: HttpRequest) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = request.headers.get("x-api-key")
    return api_key.strip() if api_key else None


async def authenticate(request: HttpRequest) -> KeyPrincipal:
    secret = secret_from_request(request)
    if not secret:
        raise errors.missing_key()
    if not secret.startswith(settings.GATEWAY_KEY_PREFIX) or len(secret) > 200:
        raise errors.invalid_key()
    secret_hash = hash_key_secret(secret)
    cached = _cache.get(secret_hash)
    if cached is not None and time.monotonic() - cached[1] < settings.GATEWAY_KEY_CACHE_SECONDS:
        principal: KeyPrincipal | None = cached[0]
    else:
        principal = await _principal(secret_hash)
    if principal is None:
        raise errors.invalid_key()
    if principal.revoked:
        raise errors.invalid_key("This API key has been revoked.")
    if principal.suspended:
        raise errors.invalid_key("This API key is suspended: its owner's account is deactivated.")
    now = timezone.now()
    if principal.key_expires_at is not None and principal.key_expires_at <= now:
        raise errors.invalid_key("This API key has expired.")
    if principal.secret_expires_at is not None and principal.secret_expires_at <= now:
        raise errors.invalid_key("This API key was rotated and its grace period has ended.")
    return principal
