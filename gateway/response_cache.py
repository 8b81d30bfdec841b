"""Opt-in exact-match response cache.

Keyed by team, endpoint, model and the normalised request, so two teams never
share an entry. On when the key (or its team) has a cache TTL, or per request with
`x-gateway-cache: on`; `Cache-Control: no-cache` skips the lookup (the fresh answer
is still stored) and `no-store` skips the cache entirely. Entries live in Redis
(in the process on the embedded default) and expire after their TTL. A stream is
cached as the events the client received, and replayed as a stream.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest

from billing.pricing import Usage
from gateway import redis_client
from gateway.auth import KeyPrincipal

logger = logging.getLogger(__name__)

# Fields that do not change the answer, left out of the cache key.
_IGNORED = frozenset({"user", "metadata", "fallbacks", "models"})
_ON = {"1", "true", "on", "yes"}
_LOCAL_MAX = 5_000


@dataclass
class Entry:
    body: bytes
    events: list[bytes]
    deployment_id: str
    usage: Usage


@dataclass(frozen=True)
class CacheKey:
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
    return CacheKey(f"gw:cache:{principal.team_id}:{digest}", int(ttl), "no-cache" not in control)


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


_local: OrderedDict[str, tuple[bytes, float]] = OrderedDict()


async def lookup(key: CacheKey) -> Entry | None:
    if not key.lookup:
        return None
    try:
        if settings.REDIS_URL:
            raw = await redis_client.guarded(redis_client.client().get(key.storage))
        else:
            found = _local.get(key.storage)
            raw = found[0] if found and found[1] > time.monotonic() else None
    except redis_client.RedisUnavailable:
        logger.warning("response cache unavailable; serving without it")
        return None
    if not raw:
        return None
    return _decode(raw.encode() if isinstance(raw, str) else raw)


async def store(key: CacheKey, entry: Entry) -> None:
    raw = _encode(entry)
    if not settings.REDIS_URL:
        _local[key.storage] = (raw, time.monotonic() + key.ttl)
        _local.move_to_end(key.storage)
        while len(_local) > _LOCAL_MAX:
            _local.popitem(last=False)
        return
    try:
        await redis_client.guarded(redis_client.client().set(key.storage, raw, ex=key.ttl))
    except redis_client.RedisUnavailable:
        logger.warning("response cache unavailable; answer not cached")
