"""Budget alerts by email and signed webhook, once per threshold; webhook management and SSRF."""

from __future__ import annotations

import itertools
import json
import time

import pytest
from django.test import override_settings

from billing import webhooks
from billing.models import BudgetAlert, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from billing.notifications import notification_settings_set
from core.models import AuditEntry
from tests.support.http import HELLO, openai_sdk
from tests.support.money import output_priced_model
from tests.support.waiting import wait_for
from tests.support.workers import send_task

pytestmark = pytest.mark.e2e


def verify(secret: str, body: bytes, header: str, tolerance: int = 300) -> bool:
    """What a receiver does (the README's snippet)."""
    import hashlib
    import hmac

    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp = int(parts["t"])
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


@override_settings(GATEWAY_WEBHOOK_ALLOW_PRIVATE=True)
def test_threshold_alerts_fire_once_each_by_email_and_signed_webhook(
    worker, receiver, mail_dir, live_gateway, make_model, make_team, make_key
):
    big = output_priced_model(make_model, output_tokens=300)
    small = output_priced_model(make_model, output_tokens=100)
    team = make_team(budget_micro_usd=1_000, alert_thresholds=[50, 100])
    client = openai_sdk(live_gateway, make_key(team=team).secret)
    created = webhooks.endpoint_create(team_id=team.id, url=receiver.url)
    notification_settings_set(
        team_id=team.id, alert_emails=["finance@example.com", "ops@example.com"]
    )

    for model, tokens in ((big, 300), (big, 300), (big, 300), (small, 100)):  # 30 60 90 100 %
        client.chat.completions.create(model=model.name, messages=HELLO, max_tokens=tokens)
    wait_for(lambda: BudgetAlert.objects.filter(team_id=team.id).count() == 2, 10)

    send_task("billing.alerts_dispatch")
    wait_for(lambda: len(receiver.received) == 2, 30, what="two webhook deliveries")
    send_task("billing.alerts_dispatch")  # a second sweep (or a redelivered task) adds nothing
    send_task("billing.alerts_dispatch")
    time.sleep(1.5)

    assert len(receiver.received) == 2
    events = {}
    for request in receiver.received:
        assert verify(created.secret, request.body, request.headers["x-gateway-signature"])
        assert not verify("whsec_wrong", request.body, request.headers["x-gateway-signature"])
        event = json.loads(request.body)
        assert request.headers["x-gateway-event-id"] == event["id"]
        events[event["data"]["threshold_percent"]] = event
    assert events[50]["type"] == "usage.threshold_reached"
    assert events[100]["type"] == "budget.exceeded"
    assert events[100]["data"] | {"alert_id": 0, "crossed_at": ""} == {
        "alert_id": 0,
        "scope": "team",
        "team_id": team.id,
        "team_name": team.name,
        "key_id": None,
        "key_name": None,
        "period": events[100]["data"]["period"],
        "threshold_percent": 100,
        "limit_usd": "0.001000",
        "spent_usd": "0.001000",
        "crossed_at": "",
    }
    assert all(a.delivered_at for a in BudgetAlert.objects.filter(team_id=team.id))

    def mails() -> list[str]:
        return [p.read_text() for p in mail_dir.glob("*.log")]

    wait_for(lambda: sum(team.name in m for m in mails()) == 2, 15, what="two emails")
    texts = [m for m in mails() if team.name in m]
    assert any("reached 50% of its budget" in m for m in texts)
    assert any("has used its whole budget" in m for m in texts)
    assert all("finance@example.com" in m and "ops@example.com" in m for m in texts)
    attempts = WebhookAttempt.objects.filter(delivery__team_id=team.id)
    assert [(a.number, a.status_code, a.error) for a in attempts] == [(1, 200, ""), (1, 200, "")]


@override_settings(GATEWAY_WEBHOOK_ALLOW_PRIVATE=True)
def test_failed_deliveries_are_retried_with_backoff_and_every_attempt_is_logged(
    worker, receiver, make_team
):
    team = make_team()
    receiver.script = [500, 503]  # the receiver is down twice, then recovers
    created = webhooks.endpoint_create(
        team_id=team.id, url=receiver.url, events=["batch.completed"]
    )
    webhooks.endpoint_create(
        team_id=team.id, url=receiver.url + "/other", events=["budget.exceeded"]
    )
    from django.db import transaction

    with transaction.atomic():
        ids = webhooks.event_emit(
            team_id=team.id, event_type="batch.completed", idempotency_key="t1", data={"id": "b"}
        )
        # The same event again (a task that ran twice) queues nothing more.
        webhooks.event_emit(
            team_id=team.id, event_type="batch.completed", idempotency_key="t1", data={"id": "b"}
        )
    assert len(ids) == 1  # only the endpoint subscribed to batch.completed
    delivery = wait_for(
        lambda: WebhookDelivery.objects.filter(id=ids[0], status="succeeded").first(), 30
    )
    assert delivery.attempts == 3 and delivery.endpoint_id == created.endpoint.id
    log = list(delivery.log.order_by("number"))
    assert [(a.number, a.status_code) for a in log] == [(1, 500), (2, 503), (3, 200)]
    assert log[0].error == "HTTP 500" and all(a.duration_ms >= 0 for a in log)
    # Backoff: each retry waited longer than the one before (base 0.3 s, doubling).
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(log)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6
    assert [json.loads(r.body)["id"] for r in receiver.received] == [delivery.event_id] * 3


def test_webhook_endpoints_are_managed_per_team_with_a_secret_shown_once(live_gateway, make_team):
    team = make_team()
    with live_gateway.admin() as admin:
        # SSRF: the live gateway does not allow private targets.
        for url in (
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://10.0.0.5/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest",
            "ftp://example.com/x",
        ):
            refused = admin.post(f"/teams/{team.id}/webhooks", json={"url": url})
            assert refused.status_code == 400, (url, refused.text)
            assert refused.json()["error"]["param"] == "url"
        created = admin.post(
            f"/teams/{team.id}/webhooks",
            json={"url": "https://hooks.example.com/gw", "events": ["invoice.finalized"]},
        )
        assert created.status_code == 201, created.text
        hook = created.json()
        assert hook["secret"].startswith("whsec_") and hook["secret"][-4:] == hook["secret_last4"]
        listed = admin.get(f"/teams/{team.id}/webhooks").json()
        assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
        assert "secret" not in admin.get(f"/teams/{team.id}/webhooks/{hook['id']}").json()
        patched = admin.patch(f"/teams/{team.id}/webhooks/{hook['id']}", json={"enabled": False})
        assert patched.json()["enabled"] is False
        bad_event = admin.patch(
            f"/teams/{team.id}/webhooks/{hook['id']}", json={"events": ["nope"]}
        )
        assert bad_event.status_code == 400
        # Another team's id does not reach this endpoint.
        other = make_team()
        assert admin.get(f"/teams/{other.id}/webhooks/{hook['id']}").status_code == 404
        assert admin.get(f"/teams/{team.id}/webhooks/{hook['id']}/deliveries").json()["count"] == 0
        notif = admin.put(
            f"/teams/{team.id}/notifications", json={"alert_emails": ["a@example.com"]}
        )
        assert notif.json() == {"team_id": team.id, "alert_emails": ["a@example.com"]}
        assert (
            admin.put(
                f"/teams/{team.id}/notifications", json={"alert_emails": ["not-an-email"]}
            ).status_code
            == 400
        )
        assert admin.delete(f"/teams/{team.id}/webhooks/{hook['id']}").status_code == 204
    row = WebhookEndpoint.objects.filter(team_id=team.id).first()
    assert row is None
    # The secret is stored encrypted, never in plaintext.
    again = webhooks.endpoint_create(team_id=team.id, url="https://hooks.example.com/2")
    stored = WebhookEndpoint.objects.get(id=again.endpoint.id)
    assert again.secret not in stored.secret_encrypted


def test_webhook_and_alert_recipient_changes_through_the_api_are_audited(live_gateway, make_team):
    team = make_team()
    with live_gateway.admin() as admin:
        created = admin.post(
            f"/teams/{team.id}/webhooks",
            json={"url": "https://hooks.example.com/audit", "events": ["budget.exceeded"]},
        )
        assert created.status_code == 201, created.text
        hook = created.json()
        secret = hook["secret"]
        token = WebhookEndpoint.objects.get(public_id=hook["id"]).secret_encrypted
        patched = admin.patch(
            f"/teams/{team.id}/webhooks/{hook['id']}",
            json={"url": "https://hooks.example.com/audit-v2", "enabled": False},
        )
        assert patched.status_code == 200, patched.text
        # Refused changes record nothing.
        assert (
            admin.patch(
                f"/teams/{team.id}/webhooks/{hook['id']}", json={"url": "http://10.0.0.5/x"}
            ).status_code
            == 400
        )
        for emails in (["a@example.com"], ["a@example.com", "b@example.com"]):
            saved = admin.put(f"/teams/{team.id}/notifications", json={"alert_emails": emails})
            assert saved.status_code == 200, saved.text
        assert (
            admin.put(
                f"/teams/{team.id}/notifications", json={"alert_emails": ["not-an-email"]}
            ).status_code
            == 400
        )
        assert admin.delete(f"/teams/{team.id}/webhooks/{hook['id']}").status_code == 204

    entries = list(
        AuditEntry.objects.filter(
            team_id=team.id, object_type__in=["webhookendpoint", "teamnotificationsettings"]
        ).order_by("id")
    )
    assert [(e.actor, e.object_type, e.action) for e in entries] == [
        ("admin-api", "webhookendpoint", "create"),
        ("admin-api", "webhookendpoint", "update"),
        ("admin-api", "teamnotificationsettings", "create"),
        ("admin-api", "teamnotificationsettings", "update"),
        ("admin-api", "webhookendpoint", "delete"),
    ]
    hook_create, hook_update, notif_create, notif_update, hook_delete = entries
    assert hook_create.before is None and hook_create.after is not None
    assert notif_create.before is None and notif_create.after is not None
    assert hook_delete.before is not None and hook_delete.after is None
    assert hook_update.before is not None and hook_update.after is not None
    assert notif_update.before is not None and notif_update.after is not None
    assert hook_create.after["public_id"] == hook["id"]
    assert hook_create.after["url"] == "https://hooks.example.com/audit"
    assert hook_create.after["events"] == ["budget.exceeded"]
    assert hook_create.after["has_secret"] is True
    assert hook_create.after["secret_last4"] == hook["secret_last4"]
    assert (hook_update.before["url"], hook_update.after["url"]) == (
        "https://hooks.example.com/audit",
        "https://hooks.example.com/audit-v2",
    )
    assert (hook_update.before["enabled"], hook_update.after["enabled"]) == (True, False)
    assert hook_delete.object_id == hook_create.object_id == hook_update.object_id
    assert hook_delete.before["url"] == "https://hooks.example.com/audit-v2"
    assert notif_create.after["alert_emails"] == ["a@example.com"]
    assert notif_update.before["alert_emails"] == ["a@example.com"]
    assert notif_update.after["alert_emails"] == ["a@example.com", "b@example.com"]
    # The secret shown once, a piece of it, and its encrypted token: in no entry at all.
    stored = json.dumps(list(AuditEntry.objects.values()), default=str)
    assert hook["id"] in stored
    for needle in (secret, secret[len("whsec_") : len("whsec_") + 16], token):
        assert needle not in stored


@override_settings(GATEWAY_WEBHOOK_ALLOW_PRIVATE=False)
def test_deliveries_to_private_addresses_are_refused_at_send_time():
    for url in ("http://127.0.0.1:8000/", "http://localhost/", "http://[::ffff:10.1.2.3]/"):
        with pytest.raises(webhooks.UnsafeTarget):
            webhooks.resolve_target(url)
    with override_settings(GATEWAY_WEBHOOK_ALLOW_PRIVATE=True):
        assert webhooks.resolve_target("http://127.0.0.1:8000/") == "127.0.0.1"
