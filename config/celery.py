"""The Celery app. Redis is the broker when REDIS_URL is set (CELERY_BROKER_URL, which defaults to
it, may point elsewhere: a Redis that never evicts); otherwise tasks run eagerly.

Worker and beat run as separate processes (`celery -A config worker`, `celery -A
config beat`). Every task is acknowledged late and rejected back to the queue if its
worker dies (settings), and idempotent, so a redelivery is harmless. The broker only
redelivers an unacknowledged task after its visibility timeout (an hour), so work
that must resume sooner after a `kill -9` (batches, webhook retries) is also found
again by the periodic sweeps below, and by the sweep each worker runs when it starts.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("gateway")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Webhook and e-mail deliveries talk to hosts our customers choose, which may be slow
# or hostile. They run on a queue of their own, consumed by workers of their own
# (scripts/run.sh, docker-compose.yml), so rollups, invoices and batches on the
# default queue never wait behind them.
DEFAULT_QUEUE = "celery"
NOTIFICATIONS_QUEUE = "webhooks"
app.conf.task_routes = {
    "billing.webhook_deliver": {"queue": NOTIFICATIONS_QUEUE},
    "billing.email_send": {"queue": NOTIFICATIONS_QUEUE},
}


def _beat_schedule(sender: Celery, **kwargs: Any) -> None:
    from django.conf import settings

    sender.conf.beat_schedule = {
        "rollups-update": {
            "task": "billing.rollups_update",
            "schedule": float(settings.GATEWAY_ROLLUP_INTERVAL_SECONDS),
        },
        # The last two days against the ledger, every night; differences are stored and logged.
        "rollups-reconcile": {
            "task": "billing.rollups_reconcile",
            "schedule": crontab(minute=20, hour=2),
            "kwargs": {"hours": 48},
        },
        # Months close at midnight in each team's timezone, so this looks every hour.
        "invoices-draft-due": {
            "task": "billing.invoices_draft_due",
            "schedule": crontab(minute=15),
        },
        "alerts-dispatch": {
            "task": "billing.alerts_dispatch",
            "schedule": float(settings.GATEWAY_ALERT_SWEEP_SECONDS),
        },
        "notifications-retry-due": {
            "task": "billing.notifications_retry_due",
            "schedule": 60.0,
        },
        # Batches whose worker stopped renewing its claim, and batches past their window.
        "batches-resume": {
            "task": "gateway.batches_resume",
            "schedule": 60.0,
        },
        # Provider batches in flight, and native batch steps whose worker stopped.
        "native-batches-poll": {
            "task": "gateway.native_batches_poll",
            "schedule": float(settings.GATEWAY_NATIVE_BATCH_POLL_SECONDS),
        },
    }


def _resume_after_start(sender: Any = None, **kwargs: Any) -> None:
    # A worker that starts after another was killed picks up its batches once their
    # claims have lapsed, without waiting for beat (or for the broker's redelivery).
    from django.conf import settings

    for name in ("gateway.batches_resume", "gateway.native_batches_poll"):
        app.send_task(name, countdown=float(settings.GATEWAY_BATCH_LEASE_SECONDS) + 0.5)


# Connected by call, not as decorators: Celery's untyped decorators would erase the types.
app.on_after_configure.connect(_beat_schedule)
worker_ready.connect(_resume_after_start)
