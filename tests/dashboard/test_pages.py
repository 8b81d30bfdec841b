"""What each dashboard page shows, to whom, and what its forms accept."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts import services as account_services
from accounts.models import KeySecret, Membership, Team, TeamRole, VirtualKey
from billing import invoices, notifications, rollups, webhooks
from billing.models import Invoice, LedgerEntry, WebhookDelivery, WebhookEndpoint
from core.crypto import decrypt_secret, hash_key_secret
from core.models import AuditEntry
from gateway.models import ModelDeployment
from tests.dashboard.conftest import (
    World,
    delivery,
    issued_invoice,
    ledger_row,
    mid_month,
    month_ago,
)

pytestmark = pytest.mark.django_db


def text(response: Any) -> str:
    return response.content.decode()


def audit_trail(object_type: str, object_id: int) -> list[AuditEntry]:
    return list(
        AuditEntry.objects.filter(object_type=object_type, object_id=str(object_id)).order_by("id")
    )


def audit_json() -> str:
    """Every audit entry's values as stored, to search for what must never be there."""
    return json.dumps(list(AuditEntry.objects.order_by("id").values()), default=str)


# --- scope: nobody sees another team's usage ------------------------------------------------


def test_it_shows_each_team_only_its_own_usage(world: World) -> None:
    for role, mine, theirs in (
        ("alice", "gpt-test", "gpt-globex-only"),
        ("bob", "gpt-test", "gpt-globex-only"),
        ("charlie", "gpt-globex-only", "gpt-test"),
    ):
        client = world.client(role)
        for url in ("/overview/", "/usage/?group_by=model", "/requests/"):
            page = text(client.get(url))
            assert mine in page, (role, url)
            assert theirs not in page, (role, url)


def test_it_shows_a_member_only_their_own_keys(world: World) -> None:
    ledger_row(world.alice_key, model="gpt-alice-only")
    page = text(world.client("bob").get("/keys/"))
    assert "bob-laptop" in page and "acme-prod" not in page
    assert "gpt-alice-only" not in text(world.client("bob").get("/requests/"))
    assert "gpt-alice-only" in text(world.client("alice").get("/requests/"))


def test_it_ignores_a_team_filter_for_a_team_the_user_is_not_in(world: World) -> None:
    page = text(world.client("charlie").get(f"/usage/?team={world.acme.id}&group_by=model"))
    assert "gpt-test" not in page


def test_it_lets_finance_read_everything_and_change_nothing(world: World) -> None:
    client = world.client("fiona")
    overview = text(client.get("/overview/"))
    assert "gpt-test" in overview and "gpt-globex-only" in overview
    assert "New key" not in overview
    assert "Add deployment" not in text(client.get("/models/"))


# --- keys ----------------------------------------------------------------------------------------


def test_it_shows_a_new_secret_once_and_stores_only_its_hash(world: World) -> None:
    client = world.client("alice")
    response = client.post(
        "/keys/new/", {"name": "ci", "team": world.acme.id, "budget_period": "monthly"}
    )
    assert response.status_code == 201
    secret = response.context["secret"]
    assert secret.startswith("sk-gw-") and secret in text(response)
    assert "no-store" in response["Cache-Control"]
    assert 'base_url="http://testserver/v1"' in text(response)  # the openai snippet
    assert 'base_url="http://testserver"' in text(response)  # the anthropic snippet
    key = VirtualKey.objects.get(name="ci")
    assert key.owner == world.alice
    assert KeySecret.objects.get(key=key).secret_hash == hash_key_secret(secret)
    for url in (f"/keys/{key.id}/", "/keys/", "/audit/", "/overview/"):
        assert secret not in text(client.get(url)), url
    assert secret not in str(list(AuditEntry.objects.values()))


def test_it_rotates_a_key_with_a_grace_period(world: World) -> None:
    client = world.client("bob")
    old = KeySecret.objects.get(key=world.bob_key)
    response = client.post(f"/keys/{world.bob_key.id}/rotate/", {"grace_seconds": "86400"})
    assert response.status_code == 200
    new_secret = response.context["secret"]
    old.refresh_from_db()
    assert old.expires_at is not None
    assert timedelta(hours=23) < old.expires_at - timezone.now() <= timedelta(hours=24)
    assert KeySecret.objects.get(secret_hash=hash_key_secret(new_secret)).expires_at is None


def test_it_revokes_a_key(world: World) -> None:
    response = world.client("bob").post(f"/keys/{world.bob_key.id}/revoke/", follow=True)
    world.bob_key.refresh_from_db()
    assert world.bob_key.revoked_at is not None
    assert "revoked" in text(response)
    assert AuditEntry.objects.filter(action="revoke", actor="bob").count() == 1


def test_it_does_not_let_a_member_set_limits_on_a_key_they_issue(world: World) -> None:
    response = world.client("bob").post(
        "/keys/new/", {"name": "mine", "team": world.acme.id, "rpm_limit": "100000"}
    )
    assert response.status_code == 201
    assert VirtualKey.objects.get(name="mine").rpm_limit is None


def test_it_sets_key_limits_with_clear_messages(world: World) -> None:
    client = world.client("alice")
    bad = client.post(
        f"/keys/{world.bob_key.id}/edit/",
        {"name": "", "budget_period": "monthly", "rpm_limit": "0", "max_budget_usd": "-1"},
    )
    assert bad.status_code == 400
    page = text(bad)
    assert "This field is required." in page
    assert "greater than or equal to 1" in page
    assert "greater than or equal to 0" in page
    good = client.post(
        f"/keys/{world.bob_key.id}/edit/",
        {
            "name": "bob-laptop",
            "budget_period": "daily",
            "max_budget_usd": "12.5",
            "rpm_limit": "60",
            "tpm_limit": "100000",
            "allowed_models": ["gpt-test"],
        },
    )
    assert good.status_code == 302
    world.bob_key.refresh_from_db()
    assert world.bob_key.max_budget_micro_usd == 12_500_000
    assert world.bob_key.allowed_models == ["gpt-test"]
    entry = AuditEntry.objects.filter(object_type="virtualkey", action="update").latest("id")
    assert entry.actor == "alice"
    assert entry.before is not None and entry.after is not None
    assert entry.before["rpm_limit"] is None and entry.after["rpm_limit"] == 60


def test_it_shows_last_use_and_spend_of_each_key(world: World) -> None:
    ledger_row(
        world.bob_key, model="gpt-test", cost=2_500_000, at=timezone.now() - timedelta(hours=2)
    )
    page = text(world.client("alice").get("/keys/"))
    assert "$2.50" in page  # 2.5 USD plus the world's 0.001234
    assert "minutes ago" in page


# --- teams and members ---------------------------------------------------------------------------


def test_it_validates_the_team_form_with_clear_messages(world: World) -> None:
    response = world.client("root").post(
        "/teams/new/",
        {
            "name": "Acme",
            "budget_usd": "-5",
            "budget_period": "fortnightly",
            "timezone": "Mars/Olympus",
            "alert_thresholds": "50, lots",
            "markup_percent": "0",
        },
    )
    assert response.status_code == 400
    page = text(response)
    assert "&#x27;Mars/Olympus&#x27; is not a timezone name" in page
    assert "&#x27;lots&#x27; is not a whole percentage." in page
    assert "greater than or equal to 0" in page
    assert "Select a valid choice" in page
    assert Team.objects.count() == 2


def test_it_reports_a_duplicate_team_name_on_the_name_field(world: World) -> None:
    response = world.client("root").post(
        "/teams/new/",
        {"name": "Acme", "budget_period": "monthly", "timezone": "UTC", "markup_percent": "0"},
    )
    assert response.status_code == 400
    assert "already exists" in str(response.context["form"].errors["name"])


def test_it_edits_a_team_and_records_before_and_after(world: World) -> None:
    response = world.client("root").post(
        f"/teams/{world.acme.id}/edit/",
        {
            "name": "Acme",
            "budget_usd": "250",
            "budget_period": "weekly",
            "timezone": "Europe/Paris",
            "alert_thresholds": "90, 50",
            "markup_percent": "12.5",
        },
    )
    assert response.status_code == 302
    world.acme.refresh_from_db()
    assert world.acme.budget_micro_usd == 250_000_000
    assert world.acme.alert_thresholds == [50, 90]
    entry = AuditEntry.objects.filter(object_type="team", action="update").latest("id")
    assert entry.before is not None and entry.after is not None
    assert entry.before["budget_period"] == "monthly" and entry.after["budget_period"] == "weekly"
    audit = text(world.client("alice").get("/audit/"))
    assert "Europe/Paris" in audit and "$250.00" in audit


def test_it_adds_sets_and_removes_members(world: World) -> None:
    client = world.client("alice")
    missing = client.post(
        f"/teams/{world.acme.id}/members/add/", {"username": "nobody", "role": "member"}
    )
    assert missing.status_code == 400
    assert "No user with that username" in text(missing)
    again = client.post(
        f"/teams/{world.acme.id}/members/add/", {"username": "bob", "role": "member"}
    )
    assert "already in Acme" in text(again)

    client.post(f"/teams/{world.acme.id}/members/add/", {"username": "dave", "role": "member"})
    dave = Membership.objects.get(user=world.dave, team=world.acme)
    client.post(f"/teams/{world.acme.id}/members/{dave.id}/role/", {"role": "admin"})
    dave.refresh_from_db()
    assert dave.role == TeamRole.ADMIN
    client.post(f"/teams/{world.acme.id}/members/{dave.id}/remove/")
    assert not Membership.objects.filter(id=dave.id).exists()
    actions = list(
        AuditEntry.objects.filter(object_type="membership", team_id=world.acme.id)
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["create", "update", "delete"]
    # Team admins read their team's history, and only theirs.
    assert "member" in text(client.get("/audit/?object_type=membership"))
    assert "membership" not in str(
        [e.object_type for e in world.client("charlie").get("/audit/").context["page_obj"]]
    )


def test_it_keeps_at_least_one_admin_in_a_team(world: World) -> None:
    response = world.client("alice").post(
        f"/teams/{world.acme.id}/members/{world.alice_membership.id}/role/",
        {"role": "member"},
        follow=True,
    )
    assert "at least one admin" in text(response)
    world.alice_membership.refresh_from_db()
    assert world.alice_membership.role == TeamRole.ADMIN


# --- models ---------------------------------------------------------------------------------------


def test_it_never_shows_a_saved_provider_credential(world: World) -> None:
    client = world.client("root")
    for url in (f"/models/{world.deployment.public_id}/", "/models/", "/audit/"):
        page = text(client.get(url))
        assert "sk-provider-secret-never-shown" not in page, url
    form_page = text(client.get(f"/models/{world.deployment.public_id}/"))
    assert "A key is saved" in form_page


def test_it_keeps_the_credential_unless_a_new_one_is_typed(world: World) -> None:
    client = world.client("root")
    fields = {
        "name": "gpt-test",
        "provider_model": "openai/gpt-test",
        "weight": "3",
        "enabled": "on",
    }
    assert client.post(f"/models/{world.deployment.public_id}/", fields).status_code == 302
    world.deployment.refresh_from_db()
    assert decrypt_secret(world.deployment.api_key_encrypted) == "sk-provider-secret-never-shown"
    client.post(f"/models/{world.deployment.public_id}/", {**fields, "api_key": "sk-new-one"})
    world.deployment.refresh_from_db()
    assert decrypt_secret(world.deployment.api_key_encrypted) == "sk-new-one"
    assert "sk-new-one" not in str(list(AuditEntry.objects.values()))
    client.post(f"/models/{world.deployment.public_id}/", {**fields, "clear_api_key": "on"})
    world.deployment.refresh_from_db()
    assert world.deployment.api_key_encrypted == ""


def test_it_validates_a_deployment_with_clear_messages(world: World) -> None:
    response = world.client("root").post(
        "/models/new/",
        {
            "name": "x",
            "provider_model": "nonsense",
            "api_base": "ftp://example.com",
            "weight": "1",
            "input_cost_per_million": "-1",
        },
    )
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert "provider/model" in str(errors["provider_model"])
    assert "http(s) URL" in str(errors["api_base"])
    assert "greater than or equal to 0" in str(errors["input_cost_per_million"])
    assert not ModelDeployment.objects.filter(name="x").exists()


def test_it_refuses_a_fallback_to_an_unknown_model(world: World) -> None:
    response = world.client("root").post(
        "/models/policy/gpt-test/",
        {
            "routing_strategy": "simple-shuffle",
            "fallbacks": "gpt-test",
            "context_window_fallbacks": "no-such-model",
            "num_retries": "2",
            "retry_backoff_seconds": "0.5",
            "max_retry_after_seconds": "10",
            "allowed_fails": "3",
            "cooldown_seconds": "10",
        },
    )
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert "cannot fall back to itself" in str(errors["fallbacks"])
    assert "not a configured model" in str(errors["context_window_fallbacks"])


def test_it_test_calls_a_deployment_and_shows_the_answer(world: World, mock_upstream: Any) -> None:
    from gateway import services

    deployment = services.deployment_create(
        name="mocked", provider_model="openai/mocked", api_base=mock_upstream.api_base
    )
    response = world.client("root").post(f"/models/{deployment.public_id}/test/")
    assert response.status_code == 200
    result = response.context["test"]
    assert result.ok, result
    assert result.answer and result.latency_ms >= 0
    assert "It works" in text(response)


def test_it_reports_a_failing_test_call(world: World) -> None:
    response = world.client("root").post(f"/models/{world.deployment.public_id}/test/")
    assert not response.context["test"].ok
    assert "The test call failed" in text(response)


# --- usage, requests, CSV -------------------------------------------------------------------------


def test_it_exports_the_rows_it_shows(world: World) -> None:
    ledger_row(
        world.bob_key, model="gpt-test", cost=1_000_000, at=timezone.now() - timedelta(hours=1)
    )
    ledger_row(
        world.bob_key, model="gpt-other", cost=500_000, at=timezone.now() - timedelta(hours=1)
    )
    client = world.client("alice")
    page = client.get("/usage/?group_by=model")
    shown = [(row.group, row.requests, row.spend_micro_usd) for row in page.context["page_obj"]]
    export = client.get("/usage/export.csv?group_by=model")
    assert export["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.content.decode())))
    exported = [(r["group"], int(r["requests"]), r["spend_usd"]) for r in rows]
    assert sorted((g, n) for g, n, _ in exported) == sorted((g, n) for g, n, _ in shown)
    assert {r["spend_usd"] for r in rows if r["group"] == "gpt-other"} == {"0.500000"}
    assert "gpt-globex-only" not in export.content.decode()


def test_it_filters_usage_by_tag_and_dates(world: World) -> None:
    ledger_row(
        world.bob_key, model="gpt-tagged", tags=["nightly"], at=timezone.now() - timedelta(hours=1)
    )
    client = world.client("alice")
    assert "gpt-tagged" in text(client.get("/usage/?tag=nightly&group_by=model"))
    assert "gpt-test" not in text(client.get("/usage/?tag=nightly&group_by=model"))
    bad = client.get("/usage/?since=2026-02-01&until=2026-01-01")
    assert "The end date is before the start date." in text(bad)


def test_it_pages_the_request_log_without_repeating_a_row(world: World) -> None:
    start = timezone.now() - timedelta(hours=3)
    for i in range(60):
        ledger_row(world.bob_key, model=f"m{i:02d}", at=start + timedelta(seconds=i))
    client = world.client("bob")
    first = client.get("/requests/")
    page_one = [row.id for row, _, _ in first.context["log"].entries]
    assert len(page_one) == 50
    cursor = first.context["log"].next_cursor
    second = client.get(f"/requests/?cursor={cursor}")
    page_two = [row.id for row, _, _ in second.context["log"].entries]
    assert len(page_two) == 11  # 60 here plus the world's row
    assert not set(page_one) & set(page_two)
    assert second.context["log"].next_cursor == ""


def test_it_filters_the_request_log_by_status_and_model(world: World) -> None:
    ledger_row(world.bob_key, model="gpt-broken", status="error", http_status=502)
    client = world.client("alice")
    errors = client.get("/requests/?status=error")
    assert [r.model for r, _, _ in errors.context["log"].entries] == ["gpt-broken"]
    by_model = client.get("/requests/?model=gpt-test")
    assert {r.model for r, _, _ in by_model.context["log"].entries} == {"gpt-test"}


def test_it_shows_a_request_without_secrets(world: World) -> None:
    page = text(world.client("alice").get(f"/requests/{world.bob_row.id}/"))
    assert world.bob_row.request_id in page and "bob-laptop" in page
    assert "sk-" not in page.replace("sk-gw-", "")


# --- security basics ------------------------------------------------------------------------------


def test_it_refuses_a_post_without_a_csrf_token(world: World) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.alice)
    response = client.post(f"/keys/{world.bob_key.id}/revoke/")
    assert response.status_code == 403
    world.bob_key.refresh_from_db()
    assert world.bob_key.revoked_at is None


def test_it_puts_a_csrf_token_in_every_form(world: World) -> None:
    client = world.client("root")
    urls = [
        "/overview/",
        "/teams/new/",
        f"/teams/{world.acme.id}/",
        f"/teams/{world.acme.id}/edit/",
        "/keys/new/",
        f"/keys/{world.bob_key.id}/",
        f"/keys/{world.bob_key.id}/edit/",
        "/models/",
        "/models/new/",
        f"/models/{world.deployment.public_id}/",
        "/models/policy/gpt-test/",
        "/users/",
        "/invoices/",
        f"/invoices/{world.acme_invoice.id}/",
        f"/invoices/{world.acme_draft.id}/",
        f"/teams/{world.acme.id}/webhooks/new/",
        f"/teams/{world.acme.id}/webhooks/{world.acme_webhook.public_id}/",
    ]
    for url in urls:
        page = text(client.get(url))
        posts = page.count('method="post"')
        assert posts, url
        assert page.count('name="csrfmiddlewaretoken"') == posts, url


def test_it_signs_in_with_a_password_and_out(world: World) -> None:
    client = Client()
    wrong = client.post("/login/", {"username": "alice", "password": "nope"})
    assert "Wrong username or password" in text(wrong)
    right = client.post(
        "/login/", {"username": "alice", "password": "correct horse battery staple"}
    )
    assert right.status_code == 302 and right["Location"] == "/overview/"
    assert client.get("/overview/").status_code == 200
    client.post("/logout/")
    assert client.get("/overview/").status_code == 302


# --- query counts: every page's queries are bounded -----------------------------------------------


def grow(world: World, n: int) -> None:
    """More of everything each list shows."""
    from gateway import services

    for i in range(n):
        team = account_services.team_create(name=f"bulk-{n}-{i}", budget_micro_usd=1_000_000)
        key = account_services.key_create(team=team, name=f"bulk-key-{i}", owner=world.alice).key
        Membership.objects.create(user=world.alice, team=team, role=TeamRole.ADMIN)
        ledger_row(key, model=f"bulk-model-{i}", at=timezone.now() - timedelta(minutes=i + 1))
        services.deployment_create(name=f"bulk-model-{i}", provider_model=f"openai/bulk-{n}-{i}")
        ledger_row(
            world.bob_key, model=f"bulk-model-{i}", at=timezone.now() - timedelta(hours=i + 1)
        )
        # Invoices: one issued to each new team, and more lines on Acme's draft.
        ledger_row(key, model=f"bulk-model-{i}", at=mid_month(1))
        issued_invoice(team, 1)
        ledger_row(world.alice_key, model=f"bulk-model-{n}-{i}", at=mid_month(1, i + 1))
        # Webhooks: more endpoints, and more deliveries with their attempts.
        webhooks.endpoint_create(team_id=world.acme.id, url=f"https://h{n}-{i}.example/in")
        delivery(world.acme_webhook, f"evt_grow_{n}_{i}")
    year, month = month_ago(1)
    invoices.invoice_draft(team_id=world.acme.id, year=year, month=month)


PAGES = [
    lambda w: "/overview/",
    lambda w: f"/overview/?team={w.acme.id}",
    lambda w: "/usage/",
    lambda w: "/usage/?group_by=key",
    lambda w: "/usage/?group_by=tag",
    lambda w: "/usage/export.csv?group_by=team",
    lambda w: "/teams/",
    lambda w: f"/teams/{w.acme.id}/",
    lambda w: "/keys/",
    lambda w: f"/keys/{w.bob_key.id}/",
    lambda w: "/keys/new/",
    lambda w: "/models/",
    lambda w: "/requests/",
    lambda w: f"/requests/{w.bob_row.id}/",
    lambda w: "/audit/",
    lambda w: "/users/",
    lambda w: "/invoices/",
    lambda w: f"/invoices/{w.acme_invoice.id}/",
    lambda w: f"/invoices/{w.acme_draft.id}/",
    lambda w: f"/teams/{w.acme.id}/webhooks/",
    lambda w: f"/teams/{w.acme.id}/webhooks/{w.acme_webhook.public_id}/",
    lambda w: f"/teams/{w.acme.id}/webhooks/{w.acme_webhook.public_id}/deliveries/",
]
# Session, user, the viewer's memberships and platform role, then the page's own (the
# overview's: two billing.usage calls of three queries each).
MAX_QUERIES = 16


def count_queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return len(queries.captured_queries)


@pytest.mark.parametrize("role", ["root", "alice"])
def test_it_reads_a_bounded_number_of_queries_per_page(world: World, role: str) -> None:
    client = world.client(role)
    root_only = {"/users/", "/models/", f"/invoices/{world.acme_draft.id}/"}
    small = {}
    grow(world, 3)
    for page in PAGES:
        url = page(world)
        if role != "root" and url in root_only:
            continue
        small[url] = count_queries(client, url)
    grow(world, 12)
    for url, before in small.items():
        after = count_queries(client, url)
        assert after <= MAX_QUERIES, (url, after)
        assert after == before, f"{url}: {before} queries with few rows, {after} with more"


def test_it_asserts_the_overview_and_usage_query_budgets(
    world: World, django_assert_num_queries: Any
) -> None:
    client = world.client("root")
    # 4 to sign in and load roles; team choices; two billing.usage calls (the rollup
    # cutoff, the daily rollups, the ledger's live tail: 3 each); the latency sample;
    # key names; a page of budgets (2).
    with django_assert_num_queries(15):
        assert client.get("/overview/").status_code == 200
    # 4 to sign in; team choices; one billing.usage call (3); the latency sample; key choices.
    with django_assert_num_queries(10):
        assert client.get("/usage/").status_code == 200
    # A member: one more for their own keys (what they see of the team's usage); their
    # budgets are their keys' (count, page, and one billing.usage call: 3).
    bob = world.client("bob")
    with django_assert_num_queries(19):
        assert bob.get("/overview/").status_code == 200


def test_it_asserts_the_invoice_and_webhook_query_budgets(
    world: World, django_assert_num_queries: Any
) -> None:
    client = world.client("root")
    hook = f"/teams/{world.acme.id}/webhooks/{world.acme_webhook.public_id}/"
    budgets = [
        # 4 to sign in; team choices; count and page of invoices.
        ("/invoices/", 7),
        # 4; the invoice; its lines.
        (f"/invoices/{world.acme_invoice.id}/", 6),
        (f"/invoices/{world.acme_invoice.id}/invoice.csv", 6),
        (f"/invoices/{world.acme_invoice.id}/print/", 6),
        # 4; the team; its endpoints with their latest delivery.
        (f"/teams/{world.acme.id}/webhooks/", 6),
        # 4; the team; the endpoint.
        (hook, 6),
        # 4; the team; the endpoint; count and page of deliveries; their attempts.
        (hook + "deliveries/", 9),
    ]
    for url, expected in budgets:
        with django_assert_num_queries(expected):
            assert client.get(url).status_code == 200, url


# --- usage from the rollups --------------------------------------------------------------------


def ledger_totals(**filters: Any) -> tuple[int, int]:
    from django.db.models import Count, Sum

    now = timezone.now()
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    sums = LedgerEntry.objects.filter(started_at__gte=start, **filters).aggregate(
        n=Count("id"), spend=Sum("charged_cost_micro_usd")
    )
    return sums["n"], sums["spend"] or 0


def test_it_adds_the_live_tail_to_the_rollups_exactly(world: World) -> None:
    # After the world's rollup run: the live tail. One row this hour, one of an hour
    # the rollups already hold (a late row), one of an earlier day.
    now = timezone.now()
    ledger_row(world.alice_key, model="gpt-late", cost=1_000_001, at=now - timedelta(minutes=1))
    ledger_row(world.alice_key, model="gpt-late", cost=2_000_002, at=now - timedelta(minutes=6))
    if now.day > 1:
        ledger_row(world.bob_key, model="gpt-late", cost=3, at=now.replace(day=1, hour=1))
    requests, spend = ledger_totals()
    data = world.client("root").get("/overview/").context["data"]
    assert (data.totals.requests, data.totals.spend_micro_usd) == (requests, spend)
    rollups.rollups_update()
    data = world.client("root").get("/overview/").context["data"]
    assert (data.totals.requests, data.totals.spend_micro_usd) == (requests, spend)
    acme = world.client("alice").get("/overview/").context["data"]
    assert acme.totals.spend_micro_usd == ledger_totals(team_id=world.acme.id)[1]


def test_it_scopes_rollup_usage_to_what_each_viewer_sees(world: World) -> None:
    """Several teams (grouped results filtered per team) and a member's own keys."""

    initech = account_services.team_create(name="Initech")
    hidden = account_services.team_create(name="Hidden")
    Membership.objects.create(user=world.alice, team=initech, role=TeamRole.ADMIN)
    Membership.objects.create(user=world.bob, team=hidden, role=TeamRole.MEMBER)
    ledger_row(account_services.key_create(team=initech, name="i").key, model="gpt-initech", cost=7)
    ledger_row(account_services.key_create(team=hidden, name="h").key, model="gpt-hidden", cost=9)
    rollups.rollups_update()
    ledger_row(world.alice_key, model="gpt-alice-tail", cost=11)  # after the cutoff

    alice = world.client("alice").get("/usage/?group_by=model").context["page_obj"]
    assert {r.group for r in alice} == {"gpt-test", "gpt-initech", "gpt-alice-tail"}
    bob = world.client("bob").get("/usage/?group_by=model")
    assert {r.group for r in bob.context["page_obj"]} == {"gpt-test"}  # his key's only
    assert "gpt-hidden" not in text(bob) and "gpt-alice-tail" not in text(bob)
    overview = world.client("bob").get("/overview/").context["data"]
    assert overview.totals.spend_micro_usd == world.bob_row.charged_cost_micro_usd
    assert [k.name for k in overview.top_keys] == ["bob-laptop"]


def test_it_shows_nothing_to_someone_in_no_team(world: World) -> None:
    client = world.client("dave")
    data = client.get("/overview/").context["data"]
    assert data.totals.requests == 0 and data.latency.requests == 0
    assert list(client.get("/usage/").context["page_obj"]) == []
    assert client.get("/invoices/").status_code == 403


def test_it_groups_usage_by_tag(world: World) -> None:
    ledger_row(world.bob_key, model="gpt-tagged", tags=["nightly", "evals"], cost=5)
    rows = world.client("alice").get("/usage/?group_by=tag").context["page_obj"]
    assert {(r.group, r.spend_micro_usd) for r in rows} == {("nightly", 5), ("evals", 5)}


def test_it_shows_local_days_for_one_team_and_says_when_days_are_utc(world: World) -> None:

    paris = account_services.team_create(name="Paris", timezone="Europe/Paris")
    Membership.objects.create(user=world.charlie, team=paris, role=TeamRole.ADMIN)
    key = account_services.key_create(team=paris, name="p").key
    # 00:30 in Paris on the 2nd is 23:30 UTC (or 22:30 in summer) on the 1st.
    local = timezone.now().astimezone(ZoneInfo("Europe/Paris"))
    if local.day == 1:
        pytest.skip("needs a second day in this month")
    moment = local.replace(day=2, hour=0, minute=30, second=0, microsecond=0)
    ledger_row(key, model="gpt-paris", at=moment, cost=4_000_000)
    rollups.rollups_update()
    client = world.client("charlie")
    one_team = client.get(f"/overview/?team={paris.id}")
    data = one_team.context["data"]
    assert not data.axis.utc_days
    assert data.spend_by_model["gpt-paris"][data.days.index(moment.date())] == 4_000_000
    assert "Days are UTC days" not in text(one_team)
    # Two months of Paris days regrouped from hours would be too many rows: UTC days.
    since = (local.date() - timedelta(days=60)).isoformat()
    wide = client.get(f"/usage/?team={paris.id}&since={since}")
    assert wide.context["axis"].utc_days and "per UTC day" in text(wide)
    assert wide.context["totals"].spend_micro_usd == 4_000_000
    # India's midnight falls on a half hour: hours cannot be regrouped, so UTC days too,
    # and every row still lands on a day of the chart.
    kolkata = account_services.team_create(name="Kolkata", timezone="Asia/Kolkata")
    Membership.objects.create(user=world.charlie, team=kolkata, role=TeamRole.ADMIN)
    ledger_row(account_services.key_create(team=kolkata, name="k").key, model="gpt-k", cost=5)
    india = client.get(f"/overview/?team={kolkata.id}")
    data = india.context["data"]
    assert data.axis.utc_days and "Days are UTC days" in text(india)
    assert sum(data.spend_by_model["gpt-k"]) == data.totals.spend_micro_usd == 5


def test_it_labels_latency_as_a_sample_of_the_last_day(world: World) -> None:
    for i, latency in enumerate((100, 200, 300, 400, 5000)):
        ledger_row(world.alice_key, model=f"gpt-l{i}", latency_ms=latency)
    two_days_ago = timezone.now() - timedelta(days=2)
    ledger_row(world.alice_key, model="gpt-old", latency_ms=99_999, at=two_days_ago)
    page = world.client("alice").get("/overview/")
    latency = page.context["data"].latency
    # alice's and bob's rows of the last 24 h (the world's at 300 ms): 300 is the median.
    assert (latency.p50_ms, latency.p95_ms) == (300, 5000)
    assert latency.requests == 6 and not latency.capped
    assert "last 24 h" in text(page) and "not the usage rollups" in text(page)
    usage_page = world.client("alice").get("/usage/")
    assert "last 24 h" in text(usage_page)
    assert not usage_page.context["charts"]["latency"].empty  # p50 and p95 per hour


# --- invoices -------------------------------------------------------------------------------------


def test_it_shows_a_finalized_invoice_with_its_number_lines_and_totals(world: World) -> None:
    invoice = world.acme_invoice
    assert invoice.number
    page = text(world.client("alice").get(f"/invoices/{invoice.id}/"))
    assert invoice.number in page and "Finalized" in page
    assert "gpt-test" in page and "gpt-other" in page
    assert "$2.25" in page  # 2.00 + 0.25, the total, to the micro-dollar
    for role in ("root", "fiona"):
        assert invoice.number in text(world.client(role).get("/invoices/"))


@pytest.mark.parametrize(
    ("role", "finalize", "void"),
    [
        ("root", True, True),
        ("fiona", True, True),
        ("alice", False, False),
        ("charlie", False, False),
    ],
)
def test_it_shows_finalize_and_void_buttons_by_role(
    world: World, role: str, finalize: bool, void: bool
) -> None:
    client = world.client(role)
    issued = world.acme_invoice if role != "charlie" else world.globex_invoice
    page = text(client.get(f"/invoices/{issued.id}/"))
    assert ('data-testid="void"' in page) is void
    assert 'data-testid="finalize"' not in page  # finalized: nothing to finalize
    draft = client.get(f"/invoices/{world.acme_draft.id}/")
    if finalize:
        assert 'data-testid="finalize"' in text(draft)
        assert 'data-testid="void"' not in text(draft)  # a draft is not voided
    else:
        assert draft.status_code == 404


def test_it_drafts_finalizes_and_voids_an_invoice(world: World) -> None:
    client = world.client("fiona")
    draft = world.acme_draft
    page = text(client.get(f"/invoices/{draft.id}/"))
    year, month = month_ago(2)
    assert "Draft invoice" in page and "Adjustments" in page
    assert f"{year:04d}-{month:02d}</td>" in page  # the month the late usage belongs to
    response = client.post(f"/invoices/{draft.id}/finalize/", follow=True)
    draft.refresh_from_db()
    assert draft.status == "finalized" and draft.number
    assert f"Invoice {draft.number} finalized" in text(response)
    # Only the latest finalized invoice can be voided: billing says why, on the page.
    refused = client.post(
        f"/invoices/{world.acme_invoice.id}/void/", {"reason": "typo"}, follow=True
    )
    assert "Only the team&#x27;s latest finalized invoice" in text(refused)
    no_reason = client.post(f"/invoices/{draft.id}/void/", {"reason": " "}, follow=True)
    assert "Say why" in text(no_reason)
    client.post(f"/invoices/{draft.id}/void/", {"reason": "wrong markup"})
    draft.refresh_from_db()
    assert draft.status == "void" and draft.void_reason == "wrong markup"
    assert "wrong markup" in text(client.get(f"/invoices/{draft.id}/"))
    # A month that has not ended cannot be drafted.
    this_month = timezone.now().strftime("%Y-%m")
    early = client.post("/invoices/draft/", {"team": world.acme.id, "month": this_month})
    assert early.status_code == 400 and "has not ended yet" in text(early)


def test_it_audits_drafting_finalizing_and_voiding_with_who_and_before_and_after(
    world: World,
) -> None:
    client = world.client("fiona")
    draft = world.acme_draft
    last_month = "{:04d}-{:02d}".format(*month_ago(1))
    # A row of last month recorded since the draft was computed: the recompute changes it.
    ledger_row(world.alice_key, model="gpt-test", at=mid_month(1, 3), cost=500_000)
    before_total = draft.total_micro_usd
    response = client.post("/invoices/draft/", {"team": world.acme.id, "month": last_month})
    assert response.status_code == 302
    # Recomputed again with nothing new: only the bookkeeping moves, nothing is recorded.
    client.post("/invoices/draft/", {"team": world.acme.id, "month": last_month})
    client.post(f"/invoices/{draft.id}/finalize/")
    client.post(f"/invoices/{draft.id}/void/", {"reason": "wrong markup"})
    draft.refresh_from_db()
    assert draft.status == "void" and draft.number

    # The fixture drafted it (as "system"); nothing else touched it in between.
    entries = audit_trail("invoice", draft.id)
    assert [(e.actor, e.action, e.team_id) for e in entries] == [
        ("system", "create", world.acme.id),
        ("fiona", "update", world.acme.id),
        ("fiona", "finalize", world.acme.id),
        ("fiona", "void", world.acme.id),
    ]
    _, update, finalize, void = entries
    assert update.before is not None and update.after is not None
    assert update.before["total_micro_usd"] == before_total
    assert update.after["total_micro_usd"] == before_total + 500_000
    assert update.before["status"] == update.after["status"] == "draft"
    assert finalize.before is not None and finalize.after is not None
    assert (finalize.before["status"], finalize.before["number"]) == ("draft", None)
    assert (finalize.after["status"], finalize.after["number"]) == ("finalized", draft.number)
    assert finalize.after["total_micro_usd"] == draft.total_micro_usd
    assert void.before is not None and void.after is not None
    assert (void.before["status"], void.before["void_reason"]) == ("finalized", "")
    assert (void.after["status"], void.after["void_reason"]) == ("void", "wrong markup")
    # Scalars only: the lines live in their own table and are not copied.
    assert "lines" not in finalize.after and finalize.after["period_label"] == last_month

    # A month with no invoice yet: a new draft, recorded as created by whoever drafted it.
    year, month = month_ago(3)
    client.post("/invoices/draft/", {"team": world.acme.id, "month": f"{year:04d}-{month:02d}"})
    new = Invoice.objects.get(team_id=world.acme.id, period_label=f"{year:04d}-{month:02d}")
    [created] = audit_trail("invoice", new.id)
    assert (created.actor, created.action, created.team_id) == ("fiona", "create", world.acme.id)
    assert created.before is None and created.after is not None
    assert created.after["status"] == "draft" and created.after["total_micro_usd"] == 0

    # Finance reads it all, and can ask for invoices only.
    shown = client.get("/audit/?object_type=invoice").context["page_obj"]
    assert {e.object_type for e in shown} == {"invoice"}
    assert {update.id, finalize.id, void.id, created.id} <= {e.id for e in shown}
    assert "wrong markup" in text(client.get("/audit/?object_type=invoice"))
    # A team admin reads what was issued to their team, not how drafts were computed.
    alice = {
        e.id for e in world.client("alice").get("/audit/?object_type=invoice").context["page_obj"]
    }
    assert {finalize.id, void.id} <= alice
    assert not {update.id, created.id} & alice
    charlie = world.client("charlie").get("/audit/?object_type=invoice").context["page_obj"]
    assert {e.team_id for e in charlie} == {world.globex.id}


def test_it_filters_and_pages_the_invoice_list(world: World) -> None:
    client = world.client("root")
    finalized = client.get("/invoices/?status=finalized").context["page_obj"]
    assert {i.id for i in finalized} == {world.acme_invoice.id, world.globex_invoice.id}
    by_team = client.get(f"/invoices/?team={world.globex.id}").context["page_obj"]
    assert [i.id for i in by_team] == [world.globex_invoice.id]
    year, month = month_ago(1)
    by_month = client.get(f"/invoices/?period={year:04d}-{month:02d}").context["page_obj"]
    assert {i.id for i in by_month} == {world.acme_draft.id, world.globex_invoice.id}
    bad = client.get("/invoices/?period=March")
    assert "Use a month as YYYY-MM" in text(bad)
    # A team admin: their team's issued invoices only, never drafts.
    alice = world.client("alice").get("/invoices/").context["page_obj"]
    assert [i.id for i in alice] == [world.acme_invoice.id]


def test_it_exports_an_invoice_as_csv_and_printable_html(world: World) -> None:
    client = world.client("alice")
    invoice = world.acme_invoice
    export = client.get(f"/invoices/{invoice.id}/invoice.csv")
    assert export["Content-Type"].startswith("text/csv")
    assert f"{invoice.number}-{invoice.period_label}.csv" in export["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(export.content.decode())))
    assert [r["amount_usd"] for r in rows if r["kind"] == "total"] == ["2.250000"]
    printable = client.get(f"/invoices/{invoice.id}/print/")
    assert printable["Content-Type"].startswith("text/html")
    assert invoice.number and invoice.number in text(printable) and "@page" in text(printable)


# --- webhooks and alert recipients ------------------------------------------------------------


def test_it_shows_a_webhook_signing_secret_once(world: World) -> None:
    client = world.client("alice")
    response = client.post(
        f"/teams/{world.acme.id}/webhooks/new/",
        {"url": "https://hooks.acme.example/new", "events": ["invoice.finalized"]},
    )
    assert response.status_code == 201
    secret = response.context["secret"]
    assert secret.startswith("whsec_") and secret in text(response)
    assert "no-store" in response["Cache-Control"]
    endpoint = WebhookEndpoint.objects.get(url="https://hooks.acme.example/new")
    assert endpoint.events == ["invoice.finalized"]
    assert secret not in endpoint.secret_encrypted
    for url in (
        f"/teams/{world.acme.id}/webhooks/",
        f"/teams/{world.acme.id}/webhooks/{endpoint.public_id}/",
        f"/teams/{world.acme.id}/",
        "/audit/",
    ):
        page = text(client.get(url))
        assert secret not in page and endpoint.secret_encrypted not in page, url
    assert f"whsec_…{secret[-4:]}" in text(client.get(f"/teams/{world.acme.id}/webhooks/"))


def test_it_validates_a_webhook_with_clear_messages(world: World) -> None:
    response = world.client("alice").post(
        f"/teams/{world.acme.id}/webhooks/new/", {"url": "ftp://127.0.0.1/x"}
    )
    assert response.status_code == 400
    assert "http:// or https://" in str(response.context["form"].errors["url"])
    local = world.client("alice").post(
        f"/teams/{world.acme.id}/webhooks/new/", {"url": "http://10.0.0.8/hook"}
    )
    assert "private" in str(local.context["form"].errors["url"])


def test_it_edits_disables_and_deletes_a_webhook(world: World) -> None:
    client = world.client("alice")
    url = f"/teams/{world.acme.id}/webhooks/{world.acme_webhook.public_id}/"
    response = client.post(url, {"url": "https://hooks.acme.example/v2", "description": "pager"})
    assert response.status_code == 302
    world.acme_webhook.refresh_from_db()
    assert world.acme_webhook.url == "https://hooks.acme.example/v2"
    assert not world.acme_webhook.enabled and world.acme_webhook.events == []
    client.post(url + "delete/")
    assert not WebhookEndpoint.objects.filter(id=world.acme_webhook.id).exists()
    assert not WebhookDelivery.objects.filter(id=world.acme_delivery.id).exists()


def test_it_audits_webhook_changes_without_the_signing_secret(world: World) -> None:
    client = world.client("alice")
    created = client.post(
        f"/teams/{world.acme.id}/webhooks/new/",
        {"url": "https://hooks.acme.example/audited", "events": ["invoice.finalized"]},
    )
    assert created.status_code == 201
    secret = created.context["secret"]
    endpoint = WebhookEndpoint.objects.get(url="https://hooks.acme.example/audited")
    token = endpoint.secret_encrypted
    page = f"/teams/{world.acme.id}/webhooks/{endpoint.public_id}/"
    edited = client.post(
        page,
        {"url": "https://hooks.acme.example/audited-v2", "description": "pager", "enabled": "on"},
    )
    assert edited.status_code == 302
    assert client.post(page + "delete/").status_code == 302

    create, update, delete = audit_trail("webhookendpoint", endpoint.id)
    assert [(e.actor, e.action, e.team_id) for e in (create, update, delete)] == [
        ("alice", "create", world.acme.id),
        ("alice", "update", world.acme.id),
        ("alice", "delete", world.acme.id),
    ]
    assert create.before is None and create.after is not None
    assert create.after["url"] == "https://hooks.acme.example/audited"
    assert create.after["public_id"] == endpoint.public_id
    assert create.after["events"] == ["invoice.finalized"]
    # That a secret is set, and its last four characters, as the pages show it.
    assert create.after["has_secret"] is True
    assert create.after["secret_last4"] == secret[-4:]
    assert "secret_encrypted" not in create.after
    assert update.before is not None and update.after is not None
    assert (update.before["url"], update.after["url"]) == (
        "https://hooks.acme.example/audited",
        "https://hooks.acme.example/audited-v2",
    )
    assert (update.before["events"], update.after["events"]) == (["invoice.finalized"], [])
    assert (update.before["description"], update.after["description"]) == ("", "pager")
    assert delete.before is not None and delete.after is None
    assert delete.before["url"] == "https://hooks.acme.example/audited-v2"

    # Neither the secret, nor a piece of it, nor its encrypted token is in any entry;
    # nor is the token of an endpoint created outside the dashboard (the fixture's).
    stored = audit_json()
    assert endpoint.public_id in stored  # the search is over the entries written above
    for needle in (secret, secret[len("whsec_") : len("whsec_") + 16], token):
        assert needle not in stored
    for other in WebhookEndpoint.objects.all():
        assert other.secret_encrypted not in stored
    assert AuditEntry.objects.filter(
        object_type="webhookendpoint", object_id=str(world.acme_webhook.id), action="create"
    ).exists()

    # Acme's admin reads it, as a webhook endpoint; Globex's admin does not.
    audit = client.get("/audit/?object_type=webhookendpoint")
    assert {e.object_type for e in audit.context["page_obj"]} == {"webhookendpoint"}
    assert "webhook endpoint" in text(audit) and "audited-v2" in text(audit)
    assert secret not in text(audit) and token not in text(audit)
    charlie = world.client("charlie").get("/audit/?object_type=webhookendpoint")
    assert {e.team_id for e in charlie.context["page_obj"]} == {world.globex.id}


def test_it_logs_every_delivery_attempt(world: World) -> None:
    page = world.client("alice").get(
        f"/teams/{world.acme.id}/webhooks/{world.acme_webhook.public_id}/deliveries/"
    )
    body = text(page)
    assert "evt_world_1" in body and "budget.exceeded" in body
    assert "ConnectTimeout: timed out" in body and "HTTP 200" in body
    assert "10 s" in body and "87 ms" in body
    assert body.count('data-testid="attempt"') == 2


def test_it_edits_the_alert_recipients_on_the_team_page(world: World) -> None:
    client = world.client("alice")
    url = f"/teams/{world.acme.id}/alerts/"
    bad = client.post(url, {"alert_emails": "ops@acme.example, not-an-address"})
    assert bad.status_code == 400 and "is not an email address" in text(bad)
    assert notifications.notification_settings_get(team_id=world.acme.id).alert_emails == []
    client.post(url, {"alert_emails": "ops@acme.example\ncfo@acme.example, ops@acme.example"})
    saved = notifications.notification_settings_get(team_id=world.acme.id).alert_emails
    assert saved == ["ops@acme.example", "cfo@acme.example"]
    assert "cfo@acme.example" in text(client.get(f"/teams/{world.acme.id}/"))
    # Finance reads them and cannot edit them.
    finance = text(world.client("fiona").get(f"/teams/{world.acme.id}/"))
    assert "cfo@acme.example" in finance and "Save recipients" not in finance


def test_it_audits_alert_recipient_changes(world: World) -> None:
    client = world.client("alice")
    url = f"/teams/{world.acme.id}/alerts/"
    assert client.post(url, {"alert_emails": "not-an-address"}).status_code == 400
    client.post(url, {"alert_emails": "ops@acme.example"})
    client.post(url, {"alert_emails": "ops@acme.example"})  # unchanged: nothing to record
    client.post(url, {"alert_emails": "ops@acme.example, cfo@acme.example"})
    row = notifications.notification_settings_get(team_id=world.acme.id)
    entries = audit_trail("teamnotificationsettings", row.id)
    assert [(e.actor, e.action, e.team_id) for e in entries] == [
        ("alice", "create", world.acme.id),
        ("alice", "update", world.acme.id),
    ]
    create, update = entries
    assert create.before is None and create.after is not None
    assert create.after["alert_emails"] == ["ops@acme.example"]
    assert update.before is not None and update.after is not None
    assert update.before["alert_emails"] == ["ops@acme.example"]
    assert update.after["alert_emails"] == ["ops@acme.example", "cfo@acme.example"]
    # The team's admins read it, under its own filter; Globex's admin does not.
    audit = client.get("/audit/?object_type=teamnotificationsettings")
    assert [e.id for e in audit.context["page_obj"]] == [update.id, create.id]
    assert "alert recipients" in text(audit) and "cfo@acme.example" in text(audit)
    charlie = world.client("charlie").get("/audit/").context["page_obj"]
    assert "teamnotificationsettings" not in {e.object_type for e in charlie}
