"""Opt-in exact-match response cache.

Keyed by team, endpoint, model and the normalised request, so two teams never
share an entry. On when the key (or its team) has a cache TTL, or per request with
`x-gateway-cache: on`; `Cache-Control: no-cache` skips the lookup (the fresh answer
is still stored) and `no-store` skips the cache entirely. Entries live in Redis
(in the process on the embedded default) and expire after their TTL. A stream is
cached as the events the client received, and replayed as a stream. Each team's
share is capped in entries and bytes (GATEWAY_CACHE_MAX_*_PER_TEAM): a team that
fills it evicts its own oldest entries, never another team's.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest

from accounts.auth import KeyPrincipal
from billing.pricing import Usage
from core import redis_client
from core.capped_store import TOO_LARGE, Caps, capped_store

logger = logging.getLogger(__name__)

# Fields that do not change the answer, left out of the cache key.
_IGNORED = frozenset({"user", "metadata", "fallbacks", "models"})
_ON = {"1", "true", "on", "yes"}


@dataclass
class Entry:
    body: bytes
    events: list[bytes]
    deployment_id: str
    usage: Usage


@dataclass(frozen=True)
class CacheKey:
    team_id: int
    storage: str
    ttl: int
    # False for `Cache-Control: no-cache`: skip the lookup, still store the answer.
    lookup: bool


def key_for(
    principal: KeyPrincipal, request: HttpRequest, endpoint: str, model: str, body: dict[str, Any]
) -> CacheKey | None:
    """The cache key for this request, or None when caching is off for it."""
    header = (request.headers.get("x-gateway-cache") or "").strip().lower()
    control = (request.headers.get("cache-control") or "").lower()
    if "no-store" in control or header in ("off", "0", "false", "no"):
        return None
    ttl = principal.cache_ttl_seconds
    if header in _ON:
        ttl = ttl or settings.GATEWAY_CACHE_TTL_SECONDS
    requested_ttl = request.headers.get("x-gateway-cache-ttl")
    if ttl and requested_ttl and requested_ttl.isdigit():
        ttl = max(1, min(int(requested_ttl), 30 * 24 * 3600))
    if not ttl:
        return None
    normalised = {k: v for k, v in body.items() if k not in _IGNORED}
    digest = hashlib.sha256(
        orjson.dumps([endpoint, model, normalised], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    return CacheKey(
        principal.team_id,
        f"gw:cache:{principal.team_id}:{digest}",
        int(ttl),
        "no-cache" not in control,
    )


def _encode(entry: Entry) -> bytes:
    return orjson.dumps(
        {
            "body": base64.b64encode(entry.body).decode(),
            # Comment lines carry the original request's cost; a hit costs its own.
            "events": [
                base64.b64encode(e).decode() for e in entry.events if not e.startswith(b":")
            ],
            "deployment_id": entry.deployment_id,
            "usage": [
                entry.usage.prompt_tokens,
                entry.usage.completion_tokens,
                entry.usage.cached_read_tokens,
                entry.usage.cache_write_tokens,
                entry.usage.reasoning_tokens,
            ],
        }
    )


def _decode(raw: bytes) -> Entry:
    data = orjson.loads(raw)
    return Entry(
        body=base64.b64decode(data["body"]),
        events=[base64.b64decode(e) for e in data["events"]],
        deployment_id=data["deployment_id"],
        usage=Usage(*data["usage"]),
    )


_backend = capped_store("gw:cache", redis_client.cache_client)


async def lookup(key: CacheKey) -> Entry | None:
    if not key.lookup:
        return None
    try:
        raw = await _backend().get(key.team_id, key.storage)
    except redis_client.RedisUnavailable:
        logger.warning("response cache unavailable; serving without it")
        return None
    if not raw:
        return None
    return _decode(raw)


async def store(key: CacheKey, entry: Entry) -> None:
    caps = Caps(
        settings.GATEWAY_CACHE_MAX_ENTRIES_PER_TEAM, settings.GATEWAY_CACHE_MAX_BYTES_PER_TEAM
    )
    try:
        if await _backend().set(key.team_id, key.storage, _encode(entry), key.ttl, caps) == (
            TOO_LARGE
        ):
            logger.info("answer larger than the team's cache cap; not cached")
    except redis_client.RedisUnavailable:
        logger.warning("response cache unavailable; answer not cached")
