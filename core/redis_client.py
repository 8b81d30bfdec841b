"""One asyncio Redis client per event loop and role, with timeouts on every call.

Two roles: `client()` is the budget Redis (budgets, rate limits, reservations,
idempotency keys: nothing there may be evicted), `cache_client()` the response
cache's Redis (disposable, LRU). Both default to REDIS_URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

T = TypeVar("T")

# Keyed by the loop's id and the URL, holding the loop too: an id can be reused by a
# new loop once an old one is gone, and a client must never outlive its loop. Two
# roles on the same URL share one client (and its pool).
_clients: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, aioredis.Redis]] = {}


class RedisUnavailable(Exception):
    pass


def client() -> aioredis.Redis:
    """The budget Redis (GATEWAY_BUDGET_REDIS_URL)."""
    return _for(settings.GATEWAY_BUDGET_REDIS_URL)


def cache_client() -> aioredis.Redis:
    """The response cache's Redis (GATEWAY_CACHE_REDIS_URL)."""
    return _for(settings.GATEWAY_CACHE_REDIS_URL)


def _for(url: str) -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    entry = _clients.get((id(loop), url))
    if entry is None or entry[0] is not loop:
        timeout = settings.REDIS_TIMEOUT_SECONDS
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=256,
        )
        entry = (loop, client)
        _clients[(id(loop), url)] = entry
    return entry[1]


async def guarded(call: Awaitable[T]) -> T:
    """Await a Redis call, bounded in time, turning every failure into RedisUnavailable.

    socket_timeout bounds each read; the outer bound also covers a connect that
    lands in a stopped Redis's backlog, and waiting for a free pooled connection.
    """
    try:
        return await asyncio.wait_for(call, settings.REDIS_TIMEOUT_SECONDS * 2)
    except (RedisError, OSError, TimeoutError) as exc:
        raise RedisUnavailable(type(exc).__name__) from exc
