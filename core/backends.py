"""The in-process/Redis pair behind admission, idempotency, the response cache and
deployment limits.

Each of those has two implementations of the same semantics: one on Redis, whose
atomic Lua scripts make it safe across processes, and one in the process, for the
embedded default (`make run`, no REDIS_URL), where the event loop makes each method
atomic because none awaits between its reads and writes. `Backend` picks one of the
two once, on first use (settings are final by then, and tests may change REDIS_URL
before the first request), and hands the same object out from then on.
`LuaScripts` registers a Redis implementation's scripts once per client: the client
is per event loop (core.redis_client), so a new loop gets its scripts registered anew.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from django.conf import settings

T = TypeVar("T")


class Backend(Generic[T]):
    """The Redis implementation when REDIS_URL is set, else the in-process one."""

    __slots__ = ("_chosen", "_local", "_redis")

    def __init__(self, *, redis: Callable[[], T], local: Callable[[], T]) -> None:
        self._redis = redis
        self._local = local
        self._chosen: T | None = None

    def __call__(self) -> T:
        chosen = self._chosen
        if chosen is None:
            chosen = self._chosen = self._redis() if settings.REDIS_URL else self._local()
        return chosen


class LuaScripts:
    """Scripts registered on the client of one Redis role, once per client."""

    __slots__ = ("_client", "_registered", "_sources")

    def __init__(self, client: Callable[[], aioredis.Redis], *sources: str) -> None:
        self._client = client
        self._sources = sources
        self._registered: dict[int, tuple[Any, ...]] = {}

    def get(self) -> tuple[Any, ...]:
        """`(client, *scripts)` for the current loop, scripts in the order given.

        One stored tuple per client, so a call on the hot path allocates nothing.
        """
        client = self._client()
        entry = self._registered.get(id(client))
        if entry is None:
            entry = (client, *(client.register_script(source) for source in self._sources))
            self._registered[id(client)] = entry
        return entry
