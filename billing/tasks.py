"""Celery tasks for money: rollups, reconciliation, invoices, alerts, webhooks, emails.

Thin: each takes ids (or nothing), calls a service and returns. Every one is
idempotent (the services claim work by compare-and-set or recompute from the
ledger), acknowledged late, and retried a bounded number of times with backoff
when the database or broker hiccups. The beat schedule is in config/celery.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from billing import invoices, notifications, rollups, webhooks
from core.tasks import durable, send, task, time_limits


@task("billing.rollups_update", **durable(**time_limits(900)))
def rollups_update() -> dict[str, Any]:
    run = rollups.rollups_update()
    return {"cutoff": run.cutoff.isoformat(), "hours": run.hours}


@task("billing.rollups_rebuild", **durable(**time_limits(3600)))
def rollups_rebuild(since: str, until: str) -> dict[str, Any]:
    run = rollups.rollups_rebuild(
        since=datetime.fromisoformat(since), until=datetime.fromisoformat(until)
    )
    return {"cutoff": run.cutoff.isoformat(), "hours": run.hours}


@task("billing.rollups_reconcile", **durable(**time_limits(1800)))
def rollups_reconcile(hours: int = 48, repair: bool = False) -> dict[str, Any]:
    until = rollups.floor_hour(timezone.now())
    run = rollups.rollups_reconcile(
        since=until - timedelta(hours=hours), until=until, repair=repair
    )
    return {"id": run.id, "ok": run.ok, "differences": len(run.differences)}


@task("billing.invoices_draft_due", **durable(**time_limits(1800)))
def invoices_draft_due() -> list[int]:
    return invoices.invoices_draft_due()


@task("billing.alerts_dispatch", **durable())
def alerts_dispatch() -> int:
    sent = 0
    for alert_id in notifications.alerts_pending():
        sent += int(notifications.alert_deliver(alert_id=alert_id).delivered)
    for alert_id in notifications.drift_alerts_pending():
        sent += int(notifications.drift_alert_deliver(alert_id=alert_id).delivered)
    return sent


@task("billing.alert_deliver", **durable())
def alert_deliver(alert_id: int) -> bool:
    return notifications.alert_deliver(alert_id=alert_id).delivered


# The delivery's own deadline ends it first; the limits catch DNS and the database.
@task(
    name="billing.webhook_deliver",
    **durable(**time_limits(settings.GATEWAY_WEBHOOK_TIMEOUT_SECONDS + 30)),
)
def webhook_deliver(delivery_id: int) -> str:
    result = webhooks.delivery_attempt(delivery_id=delivery_id)
    if result.retry_in is not None and result.retry_in <= webhooks.SHORT_RETRY_SECONDS:
        # Later retries are picked up by notifications_retry_due (beat): a long
        # countdown would sit in a worker's memory and outlive the broker's timeout.
        send("billing.webhook_deliver", delivery_id, countdown=result.retry_in)
    return result.status


# SMTP's timeout is per operation (EMAIL_TIMEOUT_SECONDS); a dripping server is cut here.
@task("billing.email_send", **durable(**time_limits(settings.EMAIL_TIMEOUT * 3 + 30)))
def email_send(email_id: int) -> str:
    return notifications.email_send(email_id=email_id)


@task("billing.notifications_retry_due", **durable())
def notifications_retry_due() -> int:
    due = webhooks.deliveries_due()
    for delivery_id in due:
        send("billing.webhook_deliver", delivery_id)
    emails = notifications.emails_due()
    for email_id in emails:
        send("billing.email_send", email_id)
    return len(due) + len(emails)
