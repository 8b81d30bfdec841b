"""Webhooks: per-team endpoints, signed events, deliveries retried with backoff.

An event is written as one WebhookDelivery row per subscribed endpoint in the same
transaction as whatever caused it (an outbox), with an event id derived from what
it is about, so emitting the same event twice (a redelivered task) adds nothing.
Workers deliver each row: claimed by compare-and-set, every attempt logged with its
status code, duration and error, retried with exponential backoff until
GATEWAY_WEBHOOK_MAX_ATTEMPTS. Each attempt has one total deadline
(GATEWAY_WEBHOOK_TIMEOUT_SECONDS: connect, headers and body) and reads at most
GATEWAY_WEBHOOK_MAX_RESPONSE_BYTES, and deliveries run on their own Celery queue
(config/celery.py), so a tarpit endpoint holds one delivery slot for the deadline at
most and never delays rollups, invoices or batches. Delivery is at least once:
receivers dedupe on the event id (`x-gateway-event-id`, and `id` in the body).

Signature (Stripe's scheme): `x-gateway-signature: t=<unix seconds>,v1=<hex>` where
hex = HMAC-SHA256(secret, f"{t}.{raw body}"). The timestamp is the attempt's, so a
receiver can refuse replays older than a few minutes.

SSRF: only http(s) URLs, and the host must resolve to public addresses only (no
loopback, private, link-local, multicast or reserved ranges) unless
GATEWAY_WEBHOOK_ALLOW_PRIVATE=1. The address checked is the address connected to
(the request is pinned to it), so DNS rebinding cannot slip past the check, and
redirects are never followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypedDict, Unpack
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from core import tasks
from core.audit import audit, snapshot
from core.crypto import decrypt_secret, encrypt_secret
from core.errors import GatewayError, invalid_request

logger = logging.getLogger(__name__)

EVENT_TYPES = (
    "usage.threshold_reached",
    "budget.exceeded",
    "batch.completed",
    "invoice.finalized",
)
SIGNATURE_HEADER = "x-gateway-signature"
USER_AGENT = "llm-gateway-webhooks/1"
MAX_ENDPOINTS_PER_TEAM = 20
# Retries sooner than this are scheduled on the broker; later ones by the sweep.
SHORT_RETRY_SECONDS = 300


# --- signing ---------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, *, tolerance: int = 300) -> bool:
    """What a receiver does (kept here for tests and as the reference implementation)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


# --- URL safety ----------------------------------------------------------------------------------


class UnsafeTarget(Exception):
    pass


def _check_scheme(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeTarget("the URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise UnsafeTarget("the URL must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeTarget("the URL has an invalid port") from None
    return parts.scheme, parts.hostname, port


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_target(url: str) -> str:
    """The address to connect to for `url`, refusing what SSRF rules forbid."""
    _, host, port = _check_scheme(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnsafeTarget(f"cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UnsafeTarget(f"cannot resolve {host}")
    if not settings.GATEWAY_WEBHOOK_ALLOW_PRIVATE:
        private = [a for a in addresses if not _public(a)]
        if private:
            raise UnsafeTarget(
                f"{host} resolves to a non-public address ({private[0]}); webhooks go to "
                "public hosts only (GATEWAY_WEBHOOK_ALLOW_PRIVATE=1 allows private ones)"
            )
    return str(addresses[0])


def validate_url(url: str) -> None:
    """At configuration time: the scheme, and literal or obviously local hosts."""
    try:
        _, host, _ = _check_scheme(url)
    except UnsafeTarget as exc:
        raise invalid_request(f"Invalid webhook url: {exc}.", param="url") from None
    if settings.GATEWAY_WEBHOOK_ALLOW_PRIVATE:
        return
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        raise invalid_request("Invalid webhook url: loopback hosts are not allowed.", param="url")
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return  # a name: checked again, resolved, at every delivery
    if not _public(str(literal)):
        raise invalid_request(
            "Invalid webhook url: private, loopback and reserved addresses are not allowed.",
            param="url",
        )


# --- endpoints (management) ----------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedEndpoint:
    endpoint: WebhookEndpoint
    secret: str  # shown once


def _check_events(events: Sequence[str]) -> list[str]:
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        raise invalid_request(
            f"Unknown event type {unknown[0]!r}; use any of {', '.join(EVENT_TYPES)}.",
            param="events",
        )
    return list(dict.fromkeys(events))


# Changes to endpoints are audited (core.audit.audit) with the actor the caller
# names: a dashboard user's name, "admin-api", or "system". The snapshot shows only
# whether a signing secret is set and its last four characters, never the token.


def endpoint_create(
    *,
    team_id: int,
    url: str,
    events: Sequence[str] = (),
    description: str = "",
    actor: str = "system",
) -> CreatedEndpoint:
    validate_url(url)
    if WebhookEndpoint.objects.filter(team_id=team_id).count() >= MAX_ENDPOINTS_PER_TEAM:
        raise GatewayError(
            f"A team can have at most {MAX_ENDPOINTS_PER_TEAM} webhook endpoints.",
            409,
            code="conflict",
        )
    secret = "whsec_" + secrets.token_urlsafe(32)
    checked = _check_events(events)
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.create(
            team_id=team_id,
            public_id="we_" + secrets.token_hex(12),
            url=url,
            description=description,
            events=checked,
            secret_encrypted=encrypt_secret(secret),
            secret_last4=secret[-4:],
        )
        audit(actor=actor, action="create", obj=endpoint, before=None, team_id=team_id)
    return CreatedEndpoint(endpoint=endpoint, secret=secret)


class EndpointChanges(TypedDict, total=False):
    """What an endpoint update may change (its secret only by rotation, never here)."""

    url: str
    description: str
    events: list[str]
    enabled: bool


def endpoint_update(
    *, endpoint: WebhookEndpoint, actor: str = "system", **fields: Unpack[EndpointChanges]
) -> WebhookEndpoint:
    if "url" in fields:
        validate_url(fields["url"])
    if "events" in fields:
        fields["events"] = _check_events(fields["events"] or [])
    before = snapshot(endpoint)
    for name, value in fields.items():
        setattr(endpoint, name, value)
    with transaction.atomic():
        endpoint.save(update_fields=[*fields, "updated_at"])
        audit(actor=actor, action="update", obj=endpoint, before=before, team_id=endpoint.team_id)
    return endpoint


def endpoint_delete(*, endpoint: WebhookEndpoint, actor: str = "system") -> None:
    with transaction.atomic():
        before, endpoint_id = snapshot(endpoint), endpoint.pk
        endpoint.delete()
        endpoint.pk = endpoint_id  # delete() clears it; the entry names what was deleted
        audit(actor=actor, action="delete", obj=endpoint, before=before, team_id=endpoint.team_id)


# --- events -------------------------------------------------------------------------------------


def event_id_for(idempotency_key: str) -> str:
    return "evt_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


def event_emit(
    *, team_id: int, event_type: str, idempotency_key: str, data: dict[str, Any]
) -> list[int]:
    """Queue `event_type` for every enabled endpoint of the team that subscribes to it.

    Call inside the transaction that makes the event true; deliveries start when it
    commits. The same `idempotency_key` never queues an event twice.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    endpoints = [
        e
        for e in WebhookEndpoint.objects.filter(team_id=team_id, enabled=True)
        if not e.events or event_type in e.events
    ]
    if not endpoints:
        return []
    event_id = event_id_for(idempotency_key)
    now = timezone.now()
    payload = orjson.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": int(now.timestamp()),
            "team_id": team_id,
            "data": data,
        }
    ).decode()
    WebhookDelivery.objects.bulk_create(
        [
            WebhookDelivery(
                endpoint=endpoint,
                team_id=team_id,
                event_id=event_id,
                event_type=event_type,
                payload=payload,
                next_attempt_at=now,
            )
            for endpoint in endpoints
        ],
        ignore_conflicts=True,
    )
    ids = list(
        WebhookDelivery.objects.filter(
            event_id=event_id, endpoint__in=endpoints, status=DeliveryStatus.PENDING
        ).values_list("id", flat=True)
    )
    transaction.on_commit(lambda: _enqueue(ids))
    return ids


def _enqueue(ids: list[int], countdown: float | None = None) -> None:
    for delivery_id in ids:
        tasks.send("billing.webhook_deliver", delivery_id, countdown=countdown)


# --- delivery -------------------------------------------------------------------------------------


def _backoff(attempt: int) -> float:
    return float(settings.GATEWAY_WEBHOOK_RETRY_BASE_SECONDS * (2 ** (attempt - 1)))


def _pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    ip_host = f"[{address}]" if ":" in address else address
    netloc = ip_host + (f":{parts.port}" if parts.port else "")
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = host + (f":{parts.port}" if parts.port else "")
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return pinned, {"host": host_header}, extensions


@dataclass
class _Exchange:
    status_code: int | None = None
    body: bytearray = field(default_factory=bytearray)


async def _post(
    exchange: _Exchange,
    url: str,
    body: bytes,
    headers: dict[str, str],
    extensions: dict[str, Any],
) -> None:
    """POST the event; the endpoint's answer is recorded into `exchange` as it arrives.

    The endpoint is chosen by a customer, so it may be a tarpit: httpx's timeouts are
    per read, and a byte every few seconds never trips them. The whole exchange
    (connect, headers, body) therefore runs under one deadline, and at most
    GATEWAY_WEBHOOK_MAX_RESPONSE_BYTES of the body are read (raw: no decompression
    bomb) before the connection is dropped. A worker slot is held for the deadline at
    most. Raises TimeoutError at the deadline.
    """
    deadline = settings.GATEWAY_WEBHOOK_TIMEOUT_SECONDS
    cap = settings.GATEWAY_WEBHOOK_MAX_RESPONSE_BYTES
    async with (
        asyncio.timeout(deadline),
        httpx.AsyncClient(timeout=deadline, follow_redirects=False, trust_env=False) as client,
        client.stream(
            "POST",
            url,
            content=body,
            headers={**headers, "accept-encoding": "identity"},
            extensions=extensions,
        ) as response,
    ):
        exchange.status_code = response.status_code
        async for chunk in response.aiter_raw():
            exchange.body += chunk[: cap - len(exchange.body)]
            if len(exchange.body) >= cap:
                break  # leaving the block closes the connection: the rest is never read


@dataclass(frozen=True)
class AttemptResult:
    status: str
    retry_in: float | None = None


def delivery_attempt(*, delivery_id: int) -> AttemptResult:
    """Make the next attempt of one delivery, if it is due and nobody else is making it."""
    now = timezone.now()
    claim_seconds = settings.GATEWAY_WEBHOOK_TIMEOUT_SECONDS + 30
    claimed = (
        WebhookDelivery.objects.filter(id=delivery_id, next_attempt_at__lte=now)
        .filter(
            Q(status=DeliveryStatus.PENDING)
            | Q(status=DeliveryStatus.SENDING, claimed_until__lt=now)
        )
        .update(status=DeliveryStatus.SENDING, claimed_until=now + timedelta(seconds=claim_seconds))
    )
    if not claimed:
        return AttemptResult("skipped")
    delivery = WebhookDelivery.objects.select_related("endpoint").get(id=delivery_id)
    endpoint = delivery.endpoint
    number = delivery.attempts + 1
    started = timezone.now()
    began = time.monotonic()
    status_code: int | None = None
    error = ""
    excerpt = ""
    if not endpoint.enabled:
        error = "endpoint disabled"
    else:
        body = delivery.payload.encode()
        try:
            address = resolve_target(endpoint.url)
            url, headers, extensions = _pinned(endpoint.url, address)
            timestamp = int(time.time())
            headers.update(
                {
                    "content-type": "application/json",
                    "user-agent": USER_AGENT,
                    SIGNATURE_HEADER: sign(
                        decrypt_secret(endpoint.secret_encrypted), body, timestamp
                    ),
                    "x-gateway-event-id": delivery.event_id,
                    "x-gateway-event-type": delivery.event_type,
                    "x-gateway-delivery-attempt": str(number),
                }
            )
            exchange = _Exchange()
            try:
                asyncio.run(_post(exchange, url, body, headers, extensions))
            except TimeoutError:
                if exchange.status_code is None:
                    error = (
                        f"timed out after {settings.GATEWAY_WEBHOOK_TIMEOUT_SECONDS:g}s "
                        "(connect, headers and body must all arrive within "
                        "GATEWAY_WEBHOOK_TIMEOUT_SECONDS)"
                    )
                # else: the endpoint answered; only its body was slow, and it is not needed
            status_code = exchange.status_code
            excerpt = bytes(exchange.body).decode(errors="replace")[:500]
            if status_code is not None and not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except UnsafeTarget as exc:
            error = f"refused: {exc}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
    duration_ms = int((time.monotonic() - began) * 1000)
    succeeded = not error
    give_up = not succeeded and (
        number >= settings.GATEWAY_WEBHOOK_MAX_ATTEMPTS or not endpoint.enabled
    )
    retry_in = None if succeeded or give_up else _backoff(number)
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery=delivery,
            number=number,
            started_at=started,
            duration_ms=duration_ms,
            status_code=status_code,
            error=error[:500],
            response_excerpt=excerpt,
        )
        status = (
            DeliveryStatus.SUCCEEDED
            if succeeded
            else DeliveryStatus.FAILED
            if give_up
            else DeliveryStatus.PENDING
        )
        WebhookDelivery.objects.filter(id=delivery_id).update(
            status=status,
            attempts=number,
            claimed_until=None,
            last_status_code=status_code,
            last_error=error[:500],
            delivered_at=timezone.now() if succeeded else None,
            next_attempt_at=now + timedelta(seconds=retry_in or 0),
        )
    if not succeeded:
        logger.warning(
            "webhook %s to %s attempt %d failed: %s%s",
            delivery.event_id,
            endpoint.public_id,
            number,
            error,
            "" if retry_in is None else f" (retry in {retry_in:.0f}s)",
        )
    return AttemptResult(status, retry_in)


def deliveries_due(*, now: datetime | None = None, limit: int = 500) -> list[int]:
    """Deliveries whose retry is due, or whose sender died mid-attempt."""
    now = now or timezone.now()
    return list(
        WebhookDelivery.objects.filter(
            Q(status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
            | Q(status=DeliveryStatus.SENDING, claimed_until__lt=now)
        )
        .order_by("next_attempt_at")
        .values_list("id", flat=True)[:limit]
    )
