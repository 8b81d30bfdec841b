"""Running ORM work from async code on the hot path.

Django's async ORM methods run on one thread per request context, and refuse to
run at all from a task that outlives its request (as a stream's billing task may).
`run_db` instead runs a short sync function on the default thread pool and hands the
connection straight back to the pool, so hot-path queries neither queue behind each
other nor hold connections between requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

P = ParamSpec("P")
T = TypeVar("T")


def _closing(fn: Callable[P, T]) -> Callable[P, T]:
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        # A thread of the pool may hold a connection that broke (Postgres restarted);
        # drop it before use rather than fail the request on it.
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return run


async def run_db(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    return await sync_to_async(_closing(fn), thread_sensitive=False)(*args, **kwargs)
