"""The webhooks pages. billing.webhooks has services for endpoints but no selectors:
these read its tables, and never the encrypted signing secret.
"""

from __future__ import annotations

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery

from accounts.models import Team
from billing import webhooks
from billing.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

_ENDPOINT_FIELDS = (
    "id",
    "team_id",
    "public_id",
    "url",
    "description",
    "events",
    "secret_last4",
    "enabled",
    "created_at",
    "updated_at",
)


def webhook_endpoints(team: Team) -> list[WebhookEndpoint]:
    """A team's endpoints (at most billing's limit) with their latest delivery."""
    latest = WebhookDelivery.objects.filter(endpoint_id=OuterRef("pk")).order_by("-id")
    return list(
        WebhookEndpoint.objects.filter(team_id=team.id)
        .only(*_ENDPOINT_FIELDS)
        .annotate(
            last_status=Subquery(latest.values("status")[:1]),
            last_event=Subquery(latest.values("event_type")[:1]),
            last_at=Subquery(latest.values("created_at")[:1]),
        )
        .order_by("id")[: webhooks.MAX_ENDPOINTS_PER_TEAM]
    )


def webhook_endpoint(team: Team, public_id: str) -> WebhookEndpoint | None:
    return WebhookEndpoint.objects.filter(team_id=team.id, public_id=public_id[:40]).first()


def webhook_count(team: Team) -> int:
    return WebhookEndpoint.objects.filter(team_id=team.id).count()


def webhook_deliveries(endpoint: WebhookEndpoint) -> QuerySet[WebhookDelivery]:
    """Newest first, each with every attempt (one query per page for all the attempts)."""
    return (
        WebhookDelivery.objects.filter(endpoint_id=endpoint.id)
        .defer("payload")
        .prefetch_related(Prefetch("log", queryset=WebhookAttempt.objects.order_by("number")))
        .order_by("-created_at", "-id")
    )
