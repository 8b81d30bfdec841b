"""The people and things the dashboard tests act on.

Personas, as in healthchecks: alice is a team admin of Acme; bob is a member of Acme
who owns one key; charlie is the admin of another team (Globex) and should see
nothing of Acme; fiona is finance; root is the platform admin.

Acme has a finalized invoice (two months ago) and a draft (last month); Globex a
finalized one. Each team has a webhook endpoint; Acme's has a delivery that took two
attempts. The usage rollups are built at the end, so the ledger rows tests add later
are the rollups' live tail, and pages read both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from accounts import services as account_services
from accounts.models import Membership, PlatformRole, StaffRole, Team, TeamRole, VirtualKey
from billing import invoices, rollups, webhooks
from billing.ledger import AttemptRecord, ledger_write
from billing.models import (
    DeliveryStatus,
    Invoice,
    LedgerEntry,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from billing.pricing import Usage
from gateway import services
from gateway.models import ModelAlias, ModelDeployment, ModelGroup

PASSWORD = "correct horse battery staple"
ROLES = ("anon", "root", "fiona", "alice", "bob", "charlie")


@dataclass
class World:
    root: User
    fiona: User
    alice: User
    bob: User
    charlie: User
    dave: User  # in no team yet: the one who gets added
    acme: Team
    globex: Team
    alice_key: VirtualKey
    bob_key: VirtualKey
    charlie_key: VirtualKey
    alice_membership: Membership
    bob_membership: Membership
    charlie_membership: Membership
    deployment: ModelDeployment
    alias: ModelAlias
    group: ModelGroup
    bob_row: LedgerEntry
    charlie_row: LedgerEntry
    acme_invoice: Invoice  # finalized, two months ago
    acme_draft: Invoice  # last month
    globex_invoice: Invoice  # finalized, last month
    acme_webhook: WebhookEndpoint
    globex_webhook: WebhookEndpoint
    acme_delivery: WebhookDelivery

    def user(self, role: str) -> User | None:
        return None if role == "anon" else getattr(self, role)

    def client(self, role: str) -> Client:
        client = Client()
        user = self.user(role)
        if user is not None:
            client.force_login(user)
        return client


def make_user(username: str, **fields: Any) -> User:
    return User.objects.create_user(username, f"{username}@example.com", PASSWORD, **fields)


def ledger_row(
    key: VirtualKey, *, model: str = "gpt-test", at: Any = None, cost: int = 1234, **fields: Any
) -> LedgerEntry:
    started = at or timezone.now() - timedelta(minutes=5)
    request_id = f"req_{key.id}_{started.timestamp()}_{model}_{fields.get('attempt', 1)}"
    ledger_write(
        [
            AttemptRecord(
                request_id=request_id,
                attempt=fields.pop("attempt", 1),
                team_id=key.team_id,
                key_id=key.id,
                endpoint="chat.completions",
                model=model,
                status=fields.pop("status", "success"),
                started_at=started,
                ended_at=started + timedelta(milliseconds=fields.get("latency_ms", 300)),
                usage=Usage(prompt_tokens=10, completion_tokens=20),
                list_cost_micro_usd=cost,
                charged_cost_micro_usd=cost,
                http_status=fields.pop("http_status", 200),
                latency_ms=fields.pop("latency_ms", 300),
                provider="openai",
                provider_model=f"openai/{model}",
                **fields,
            )
        ]
    )
    return LedgerEntry.objects.get(request_id=request_id)


def month_ago(months: int) -> tuple[int, int]:
    """(year, month) of the UTC month `months` before this one."""
    today = timezone.now().date()
    index = today.year * 12 + today.month - 1 - months
    return index // 12, index % 12 + 1


def mid_month(months: int, hours: int = 0) -> datetime:
    year, month = month_ago(months)
    return datetime(year, month, 15, 12, tzinfo=UTC) + timedelta(hours=hours)


def issued_invoice(team: Team, months: int) -> Invoice:
    year, month = month_ago(months)
    draft = invoices.invoice_draft(team_id=team.id, year=year, month=month)
    return invoices.invoice_finalize(invoice_id=draft.id)


def delivery(endpoint: WebhookEndpoint, event_id: str, *, failed_first: bool = True) -> Any:
    """A delivered event whose first attempt timed out."""
    now = timezone.now()
    row = WebhookDelivery.objects.create(
        endpoint=endpoint,
        team_id=endpoint.team_id,
        event_id=event_id,
        event_type="budget.exceeded",
        payload="{}",
        status=DeliveryStatus.SUCCEEDED,
        attempts=2 if failed_first else 1,
        next_attempt_at=now,
        last_status_code=200,
        delivered_at=now,
    )
    if failed_first:
        WebhookAttempt.objects.create(
            delivery=row,
            number=1,
            started_at=now - timedelta(seconds=40),
            duration_ms=10_004,
            error="ConnectTimeout: timed out",
        )
    WebhookAttempt.objects.create(
        delivery=row,
        number=2 if failed_first else 1,
        started_at=now - timedelta(seconds=5),
        duration_ms=87,
        status_code=200,
    )
    return row


@pytest.fixture
def world(db: Any, settings: Any) -> World:
    # Invoices cover the rows written a moment ago (by default they trail "now" by a minute).
    settings.GATEWAY_INVOICE_CUTOFF_LAG_SECONDS = 0
    root = User.objects.create_superuser("root", "root@example.com", PASSWORD)
    fiona = make_user("fiona")
    StaffRole.objects.create(user=fiona, role=PlatformRole.FINANCE)
    alice, bob, charlie, dave = (make_user(n) for n in ("alice", "bob", "charlie", "dave"))
    acme = account_services.team_create(
        name="Acme", budget_micro_usd=100_000_000, alert_thresholds=[50, 80, 100]
    )
    globex = account_services.team_create(name="Globex", budget_micro_usd=50_000_000)
    memberships = {
        "alice": Membership.objects.create(user=alice, team=acme, role=TeamRole.ADMIN),
        "bob": Membership.objects.create(user=bob, team=acme, role=TeamRole.MEMBER),
        "charlie": Membership.objects.create(user=charlie, team=globex, role=TeamRole.ADMIN),
    }
    keys = {
        "alice": account_services.key_create(team=acme, name="acme-prod", owner=alice).key,
        "bob": account_services.key_create(team=acme, name="bob-laptop", owner=bob).key,
        "charlie": account_services.key_create(team=globex, name="globex-prod", owner=charlie).key,
    }
    # Nothing listens on port 9: a test call fails fast, which is all the matrix needs.
    deployment = services.deployment_create(
        name="gpt-test",
        provider_model="openai/gpt-test",
        api_base="http://127.0.0.1:9/v1",
        api_key="sk-provider-secret-never-shown",
        input_cost_per_million=Decimal("1"),
        output_cost_per_million=Decimal("2"),
    )
    services.deployment_create(name="gpt-other", provider_model="openai/gpt-other")
    alias = services.alias_create(alias="gpt-alias", target="gpt-test")
    group = services.group_save(name="gpt-test", fallbacks=["gpt-other"])
    bob_row = ledger_row(keys["bob"], model="gpt-test")
    charlie_row = ledger_row(keys["charlie"], model="gpt-globex-only")
    # Past months, for the invoices (never on bob's key: his request log stays one row).
    ledger_row(keys["alice"], model="gpt-test", at=mid_month(2), cost=2_000_000)
    ledger_row(keys["alice"], model="gpt-other", at=mid_month(2, 1), cost=250_000)
    ledger_row(keys["alice"], model="gpt-test", at=mid_month(1), cost=3_000_000)
    ledger_row(keys["charlie"], model="gpt-globex-only", at=mid_month(1), cost=700_000)
    acme_invoice = issued_invoice(acme, 2)
    # Recorded after that invoice was finalized: an adjustment line on the next one.
    ledger_row(keys["alice"], model="gpt-test", at=mid_month(2, 2), cost=100_000)
    year, month = month_ago(1)
    acme_draft = invoices.invoice_draft(team_id=acme.id, year=year, month=month)
    globex_invoice = issued_invoice(globex, 1)
    acme_webhook = webhooks.endpoint_create(
        team_id=acme.id, url="https://hooks.acme.example/gateway", events=["budget.exceeded"]
    ).endpoint
    globex_webhook = webhooks.endpoint_create(
        team_id=globex.id, url="https://hooks.globex.example/in"
    ).endpoint
    acme_delivery = delivery(acme_webhook, "evt_world_1")
    rollups.rollups_update()
    return World(
        root=root,
        fiona=fiona,
        alice=alice,
        bob=bob,
        charlie=charlie,
        dave=dave,
        acme=acme,
        globex=globex,
        alice_key=keys["alice"],
        bob_key=keys["bob"],
        charlie_key=keys["charlie"],
        alice_membership=memberships["alice"],
        bob_membership=memberships["bob"],
        charlie_membership=memberships["charlie"],
        deployment=deployment,
        alias=alias,
        group=group,
        bob_row=bob_row,
        charlie_row=charlie_row,
        acme_invoice=acme_invoice,
        acme_draft=acme_draft,
        globex_invoice=globex_invoice,
        acme_webhook=acme_webhook,
        globex_webhook=globex_webhook,
        acme_delivery=acme_delivery,
    )
