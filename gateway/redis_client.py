"""One asyncio Redis client per event loop, with timeouts on every call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

T = TypeVar("T")

_clients: dict[int, aioredis.Redis] = {}


class RedisUnavailable(Exception):
    pass


def client() -> aioredis.Redis:
    loop_id = id(asyncio.get_running_loop())
    found = _clients.get(loop_id)
    if found is None:
        timeout = settings.REDIS_TIMEOUT_SECONDS
        found = aioredis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=256,
        )
        _clients[loop_id] = found
    return found


async def guarded(call: Awaitable[T]) -> T:
    """Await a Redis call, bounded in time, turning every failure into RedisUnavailable.

    socket_timeout bounds each read; the outer bound also covers a connect that
    lands in a stopped Redis's backlog, and waiting for a free pooled connection.
    """
    try:
        return await asyncio.wait_for(call, settings.REDIS_TIMEOUT_SECONDS * 2)
    except (RedisError, OSError, TimeoutError) as exc:
        raise RedisUnavailable(type(exc).__name__) from exc
