"""Running ORM work from async code on the hot path.

Django's async ORM methods run on one thread per request context, and refuse to
run at all from a task that outlives its request (as a stream's billing task may).
`run_db` instead runs a short sync function on the default thread pool, on the
"hotpath" database alias: each of those long-lived threads keeps one persistent
connection, so a request pays neither a thread start nor a connection checkout.
A connection that died (Postgres restarted) fails once and is replaced: the call is
retried on a fresh connection, which is safe because every hot-path function is a
read or an idempotent insert.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, connections

P = ParamSpec("P")
T = TypeVar("T")

HOT_PATH_ALIAS = "hotpath"
_on_hot_path: contextvars.ContextVar[bool] = contextvars.ContextVar("on_hot_path", default=False)


class HotPathRouter:
    """Sends queries made inside run_db to the "hotpath" alias; everything else to default."""

    def db_for_read(self, model: type[Any], **hints: Any) -> str | None:
        return HOT_PATH_ALIAS if _on_hot_path.get() else None

    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        return HOT_PATH_ALIAS if _on_hot_path.get() else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        # One database under two names: migrate it once, through default.
        return db != HOT_PATH_ALIAS


def _on_worker(fn: Callable[P, T]) -> Callable[P, T]:
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        token = _on_hot_path.set(True)
        connection = connections[HOT_PATH_ALIAS]
        try:
            connection.close_if_unusable_or_obsolete()
            try:
                return fn(*args, **kwargs)
            except (OperationalError, InterfaceError):
                if connection.in_atomic_block:
                    raise
                # Most likely a connection that died with a Postgres restart.
                connection.close()
                return fn(*args, **kwargs)
        finally:
            _on_hot_path.reset(token)

    return run


async def run_db(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    return await sync_to_async(_on_worker(fn), thread_sensitive=False)(*args, **kwargs)


def _on_default(fn: Callable[P, T]) -> Callable[P, T]:
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        connection = connections["default"]
        connection.close_if_unusable_or_obsolete()
        try:
            return fn(*args, **kwargs)
        finally:
            # Hand the pooled connection back: this thread may not run again soon.
            connection.close()

    return run


async def run_db_atomic(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Like run_db, on the default alias, for work that opens transactions.

    `transaction.atomic()` and `select_for_update()` act on the default alias, so
    functions that use them must run there, not on the hot-path alias.
    """
    return await sync_to_async(_on_default(fn), thread_sensitive=False)(*args, **kwargs)
