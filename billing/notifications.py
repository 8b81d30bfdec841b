"""Alerts leave the building: an email and a webhook, once per threshold per period.

Budget alerts, and drift alerts from the reconciliation with the providers' bills
(email only, to finance: see below).

billing.alerts records a BudgetAlert when a settle crosses a threshold (the unique
constraint makes that once per scope, owner, period and threshold). Here a worker
claims each undelivered alert by compare-and-set on `delivered_at` and, in the same
transaction, writes its outbox rows: the webhook deliveries and the email. If the
worker dies before committing, nothing happened and the alert is claimed again; if
it dies after, the outbox rows are there and are sent (and retried) on their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing import webhooks
from billing.models import (
    BudgetAlert,
    DeliveryStatus,
    DriftAlert,
    EmailNotification,
    TeamNotificationSettings,
)
from billing.pricing import micro_usd_to_str
from core import tasks
from core.audit import audit, snapshot
from core.errors import invalid_request

logger = logging.getLogger(__name__)

# Alerts older than this when first seen (e.g. recorded before the workers ran) are
# marked delivered without sending: a stale alert is noise, not news.
ALERT_MAX_AGE = timedelta(days=2)
MAX_RECIPIENTS = 20


# --- team settings -------------------------------------------------------------------------------


def notification_settings_get(*, team_id: int) -> TeamNotificationSettings:
    found = TeamNotificationSettings.objects.filter(team_id=team_id).first()
    return found or TeamNotificationSettings(team_id=team_id, alert_emails=[])


def notification_settings_set(
    *, team_id: int, alert_emails: list[str], actor: str = "system"
) -> TeamNotificationSettings:
    """Replace the team's alert recipients.

    Audited as "create" the first time, then as "update" whenever the list changes.
    """
    from django.core.exceptions import ValidationError
    from django.core.validators import validate_email

    cleaned = list(dict.fromkeys(e.strip() for e in alert_emails if e.strip()))
    if len(cleaned) > MAX_RECIPIENTS:
        raise invalid_request(f"At most {MAX_RECIPIENTS} alert recipients.", param="alert_emails")
    for address in cleaned:
        try:
            validate_email(address)
        except ValidationError:
            raise invalid_request(
                f"{address!r} is not an email address.", param="alert_emails"
            ) from None
    with transaction.atomic():
        # Locked, so two saves at once record two honest befores, not the same one twice.
        row, created = TeamNotificationSettings.objects.select_for_update().get_or_create(
            team_id=team_id, defaults={"alert_emails": cleaned}
        )
        if created:
            audit(actor=actor, action="create", obj=row, before=None, team_id=team_id)
            return row
        if row.alert_emails == cleaned:
            return row  # saved unchanged: nothing to write or to record
        before = snapshot(row)
        row.alert_emails = cleaned
        row.save(update_fields=["alert_emails", "updated_at"])
        audit(actor=actor, action="update", obj=row, before=before, team_id=team_id)
    return row


# --- alerts --------------------------------------------------------------------------------------


def alerts_pending(*, limit: int = 500) -> list[int]:
    return list(
        BudgetAlert.objects.filter(delivered_at__isnull=True)
        .order_by("crossed_at")
        .values_list("id", flat=True)[:limit]
    )


def _names(alert: BudgetAlert) -> tuple[str, str]:
    from accounts.models import Team, VirtualKey

    team = Team.objects.filter(id=alert.team_id).values_list("name", flat=True).first() or ""
    key = ""
    if alert.scope == "key":
        key = (
            VirtualKey.objects.filter(id=alert.owner_id).values_list("name", flat=True).first()
            or ""
        )
    return team, key


def alert_event(alert: BudgetAlert) -> tuple[str, dict[str, Any]]:
    team_name, key_name = _names(alert)
    event_type = "budget.exceeded" if alert.threshold_percent >= 100 else "usage.threshold_reached"
    data = {
        "alert_id": alert.id,
        "scope": alert.scope,
        "team_id": alert.team_id,
        "team_name": team_name,
        "key_id": alert.owner_id if alert.scope == "key" else None,
        "key_name": key_name or None,
        "period": alert.period_id,
        "threshold_percent": alert.threshold_percent,
        "limit_usd": micro_usd_to_str(alert.limit_micro_usd),
        "spent_usd": micro_usd_to_str(alert.spent_micro_usd),
        "crossed_at": alert.crossed_at.isoformat(),
    }
    return event_type, data


def _email_text(event_type: str, data: dict[str, Any]) -> tuple[str, str]:
    who = (
        f"Key '{data['key_name'] or data['key_id']}' of team '{data['team_name']}'"
        if data["scope"] == "key"
        else f"Team '{data['team_name'] or data['team_id']}'"
    )
    if event_type == "budget.exceeded":
        subject = f"[LLM Gateway] {who} has used its whole budget"
        lead = (
            f"{who} has reached {data['threshold_percent']}% of its budget: requests that "
            "would cost more are refused until the period ends or the budget is raised."
        )
    else:
        subject = f"[LLM Gateway] {who} reached {data['threshold_percent']}% of its budget"
        lead = f"{who} has used {data['threshold_percent']}% of its budget."
    body = (
        f"{lead}\n\n"
        f"Spent:  ${data['spent_usd']}\n"
        f"Budget: ${data['limit_usd']}\n"
        f"Period: {data['period']}\n"
        f"Crossed at: {data['crossed_at']}\n\n"
        "You receive this because your address is on the team's alert list in the gateway.\n"
    )
    return subject, body


@dataclass(frozen=True)
class AlertOutcome:
    delivered: bool
    webhooks: int = 0
    emails: int = 0


def alert_deliver(*, alert_id: int, now: datetime | None = None) -> AlertOutcome:
    """Claim one alert and write its email and webhook deliveries, exactly once."""
    now = now or timezone.now()
    with transaction.atomic():
        claimed = BudgetAlert.objects.filter(id=alert_id, delivered_at__isnull=True).update(
            delivered_at=now
        )
        if not claimed:
            return AlertOutcome(False)
        alert = BudgetAlert.objects.get(id=alert_id)
        if now - alert.crossed_at > ALERT_MAX_AGE:
            logger.info(
                "budget alert %s is stale (crossed %s); not sent", alert.id, alert.crossed_at
            )
            return AlertOutcome(True)
        event_type, data = alert_event(alert)
        hooks = webhooks.event_emit(
            team_id=alert.team_id,
            event_type=event_type,
            idempotency_key=f"budget_alert:{alert.id}",
            data=data,
        )
        recipients = notification_settings_get(team_id=alert.team_id).alert_emails
        emails = 0
        if recipients:
            subject, body = _email_text(event_type, data)
            email, created = EmailNotification.objects.get_or_create(
                key=f"budget_alert:{alert.id}",
                defaults={
                    "team_id": alert.team_id,
                    "recipients": recipients,
                    "subject": subject,
                    "body": body,
                    "next_attempt_at": now,
                },
            )
            if created:
                emails = 1
                transaction.on_commit(lambda: _enqueue_email(email.id))
    return AlertOutcome(True, len(hooks), emails)


# --- drift alerts (reconciliation with the providers' bills) --------------------------------------
# A provider's bill is the platform's, not a team's: a drift alert goes by email to the
# finance staff and the platform admins. It has no webhook, because webhook endpoints
# belong to teams and a team must not see what the company pays its providers.

# EmailNotification.team_id of a platform-wide email (no team owns it).
PLATFORM_TEAM_ID = 0


def drift_alerts_pending(*, limit: int = 500) -> list[int]:
    return list(
        DriftAlert.objects.filter(delivered_at__isnull=True)
        .order_by("crossed_at")
        .values_list("id", flat=True)[:limit]
    )


def finance_recipients() -> list[str]:
    """The addresses of active finance staff and platform admins, each once."""
    from django.contrib.auth import get_user_model

    from accounts.models import PlatformRole

    users = get_user_model().objects.filter(is_active=True).exclude(email="")
    finance = Q(staff_role__role=PlatformRole.FINANCE) | Q(is_superuser=True)
    return sorted(set(users.filter(finance).values_list("email", flat=True)))[:MAX_RECIPIENTS]


def _drift_email(alert: DriftAlert) -> tuple[str, str]:
    ours = micro_usd_to_str(alert.ledger_cost_micro_usd)
    subject = (
        f"[LLM Gateway] {alert.provider} billed {alert.drift_percent}% off our ledger "
        f"for {alert.model} on {alert.day}"
    )
    body = (
        f"The {alert.provider} bill and the gateway's ledger disagree by more than "
        f"{alert.threshold_percent}% for {alert.model} on {alert.day} (UTC).\n\n"
        f"Provider's cost: ${alert.provider_cost_usd.normalize():f}\n"
        f"Ledger list cost: ${ours}\n"
        f"Drift: {alert.drift_percent}% of the provider's cost\n\n"
        "Check the model's prices in the gateway, or the export that was imported.\n"
    )
    return subject, body


def drift_alert_deliver(*, alert_id: int, now: datetime | None = None) -> AlertOutcome:
    """Claim one drift alert and write its email, exactly once (as alert_deliver does)."""
    now = now or timezone.now()
    with transaction.atomic():
        claimed = DriftAlert.objects.filter(id=alert_id, delivered_at__isnull=True).update(
            delivered_at=now
        )
        if not claimed:
            return AlertOutcome(False)
        alert = DriftAlert.objects.get(id=alert_id)
        recipients = finance_recipients()
        if not recipients:
            logger.warning("drift alert %s: no finance staff or admin has an email", alert.id)
            return AlertOutcome(True)
        subject, body = _drift_email(alert)
        email, created = EmailNotification.objects.get_or_create(
            key=f"drift_alert:{alert.id}",
            defaults={
                "team_id": PLATFORM_TEAM_ID,
                "recipients": recipients,
                "subject": subject,
                "body": body,
                "next_attempt_at": now,
            },
        )
        if created:
            transaction.on_commit(lambda: _enqueue_email(email.id))
    return AlertOutcome(True, 0, int(created))


def _enqueue_email(email_id: int, countdown: float | None = None) -> None:
    tasks.send("billing.email_send", email_id, countdown=countdown)


# --- the email outbox ------------------------------------------------------------------------


def email_send(*, email_id: int) -> str:
    now = timezone.now()
    claimed = (
        EmailNotification.objects.filter(id=email_id, next_attempt_at__lte=now)
        .filter(
            Q(status=DeliveryStatus.PENDING)
            | Q(status=DeliveryStatus.SENDING, claimed_until__lt=now)
        )
        .update(
            status=DeliveryStatus.SENDING,
            claimed_until=now + timedelta(seconds=settings.EMAIL_TIMEOUT + 60),
        )
    )
    if not claimed:
        return "skipped"
    email = EmailNotification.objects.get(id=email_id)
    attempt = email.attempts + 1
    try:
        EmailMessage(
            subject=email.subject,
            body=email.body,
            from_email=settings.DEFAULT_FROM_EMAIL,
            to=list(email.recipients),
        ).send(fail_silently=False)
    except Exception as exc:
        give_up = attempt >= settings.GATEWAY_EMAIL_MAX_ATTEMPTS
        delay = 60 * (2 ** (attempt - 1))
        EmailNotification.objects.filter(id=email_id).update(
            status=DeliveryStatus.FAILED if give_up else DeliveryStatus.PENDING,
            attempts=attempt,
            claimed_until=None,
            last_error=f"{type(exc).__name__}: {exc}"[:500],
            next_attempt_at=now + timedelta(seconds=delay),
        )
        logger.warning("alert email %s attempt %d failed: %s", email.key, attempt, exc)
        return "failed" if give_up else "retry"
    EmailNotification.objects.filter(id=email_id).update(
        status=DeliveryStatus.SUCCEEDED,
        attempts=attempt,
        claimed_until=None,
        last_error="",
        sent_at=timezone.now(),
    )
    return "sent"


def emails_due(*, now: datetime | None = None, limit: int = 500) -> list[int]:
    now = now or timezone.now()
    return list(
        EmailNotification.objects.filter(
            Q(status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
            | Q(status=DeliveryStatus.SENDING, claimed_until__lt=now)
        )
        .order_by("next_attempt_at")
        .values_list("id", flat=True)[:limit]
    )
