"""One asyncio Redis client per event loop, with timeouts on every call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

T = TypeVar("T")

# Keyed by the loop's id, holding the loop too: an id can be reused by a new loop
# once an old one is gone, and a client must never outlive the loop it belongs to.
_clients: dict[int, tuple[asyncio.AbstractEventLoop, aioredis.Redis]] = {}


class RedisUnavailable(Exception):
    pass


def client() -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    entry = _clients.get(id(loop))
    if entry is None or entry[0] is not loop:
        timeout = settings.REDIS_TIMEOUT_SECONDS
        client = aioredis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=256,
        )
        entry = (loop, client)
        _clients[id(loop)] = entry
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
