"""The people and things the dashboard tests act on.

Personas, as in healthchecks: alice is a team admin of Acme; bob is a member of Acme
who owns one key; charlie is the admin of another team (Globex) and should see
nothing of Acme; fiona is finance; root is the platform admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from billing.ledger import AttemptRecord, ledger_write
from billing.models import LedgerEntry
from billing.pricing import Usage
from dashboard.models import Membership, PlatformRole, StaffRole, TeamRole
from gateway import services
from gateway.models import ModelAlias, ModelDeployment, ModelGroup, Team, VirtualKey

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


@pytest.fixture
def world(db: Any) -> World:
    root = User.objects.create_superuser("root", "root@example.com", PASSWORD)
    fiona = make_user("fiona")
    StaffRole.objects.create(user=fiona, role=PlatformRole.FINANCE)
    alice, bob, charlie, dave = (make_user(n) for n in ("alice", "bob", "charlie", "dave"))
    acme = services.team_create(
        name="Acme", budget_micro_usd=100_000_000, alert_thresholds=[50, 80, 100]
    )
    globex = services.team_create(name="Globex", budget_micro_usd=50_000_000)
    memberships = {
        "alice": Membership.objects.create(user=alice, team=acme, role=TeamRole.ADMIN),
        "bob": Membership.objects.create(user=bob, team=acme, role=TeamRole.MEMBER),
        "charlie": Membership.objects.create(user=charlie, team=globex, role=TeamRole.ADMIN),
    }
    keys = {
        "alice": services.key_create(team=acme, name="acme-prod", owner=alice).key,
        "bob": services.key_create(team=acme, name="bob-laptop", owner=bob).key,
        "charlie": services.key_create(team=globex, name="globex-prod", owner=charlie).key,
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
        bob_row=ledger_row(keys["bob"], model="gpt-test"),
        charlie_row=ledger_row(keys["charlie"], model="gpt-globex-only"),
    )
