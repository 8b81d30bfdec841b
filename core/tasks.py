"""What every Celery task shares, and how services enqueue one.

Tasks are `shared_task`s in each app's `tasks.py`; services never import them. They
enqueue by name with `enqueue`, after their transaction commits, so the task sees
the rows it was sent for, and neither side imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from celery import current_app, shared_task
from django.db import transaction

# Between a task's soft limit (SoftTimeLimitExceeded, a chance to stop cleanly) and
# the hard one (the pool process is killed and replaced).
HARD_LIMIT_GRACE_SECONDS = 60


def time_limits(soft_seconds: float) -> dict[str, float]:
    """Per-task limits for a task that runs longer (or must stop sooner) than the default
    (settings.CELERY_TASK_SOFT_TIME_LIMIT)."""
    return {"soft_time_limit": soft_seconds, "time_limit": soft_seconds + HARD_LIMIT_GRACE_SECONDS}


def durable(**overrides: Any) -> dict[str, Any]:
    """Options every task shares: late ack, bounded retries with exponential backoff.

    Time limits come from settings (every task has them) unless `time_limits(...)`
    is passed for a task that needs other ones.

    Only failures that a retry can cure are retried (the database or the broker
    being briefly unreachable); a bug fails the task at once, loudly.
    """
    from django.db import InterfaceError, OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    options: dict[str, Any] = {
        "acks_late": True,
        "reject_on_worker_lost": True,
        "autoretry_for": (OperationalError, InterfaceError, RedisConnectionError),
        "max_retries": 5,
        "retry_backoff": 2,
        "retry_backoff_max": 300,
        "retry_jitter": True,
    }
    options.update(overrides)
    return options


def send(name: str, *args: Any, countdown: float | None = None) -> None:
    """Queue the task registered under `name` now (run at once in eager mode, without a broker)."""
    app = current_app
    if app.conf.task_always_eager:
        # Eager mode runs the task in this process, so its module must be loaded; a web
        # process imports no tasks module of its own accord (only workers autodiscover).
        app.loader.import_default_modules()
        app.tasks[name].apply_async(args, countdown=countdown)
    else:
        # By name: routing (task_routes) and the task's options apply on the way and in
        # the worker; this process needs neither the task nor its module.
        app.send_task(name, args=args, countdown=countdown)


def enqueue(name: str, *args: Any, countdown: float | None = None) -> None:
    """Queue the task once the current transaction commits (at once outside one)."""
    transaction.on_commit(lambda: send(name, *args, countdown=countdown))


F = TypeVar("F", bound=Callable[..., Any])


def task(name: str, **options: Any) -> Callable[[F], F]:
    """`shared_task` under an explicit name, keeping the function's type for mypy.

    Celery ships no type hints; callers queue tasks by name (`send`/`enqueue`), never
    through the task object, so the decorated function is all the type checker needs.
    """
    return cast(Callable[[F], F], shared_task(name=name, **options))
