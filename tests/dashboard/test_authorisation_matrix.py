"""Every dashboard URL against every role: the status each one gets, and nothing changed
when an action was refused.

The expected table is kept here, one line per URL, one column per role:

    anon   root   fiona    alice        bob            charlie
           (platform admin) (finance)  (Acme admin) (Acme member, owns bob_key) (Globex admin)

302 for anon is the redirect to the login page. A 404 means the object belongs to a
team the user cannot see at all (its existence is not revealed); a 403 means they
can see it but not do that.

Invoices: finance and platform admins read, draft, finalize and void every team's; a
team admin reads the invoices issued to their team (finalized or void; a draft is a
404 to them); members have no invoice pages. Webhooks and alert recipients: a team's
admins and platform admins; finance and members are refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import transaction

from accounts.models import KeySecret, Membership, StaffRole, Team, VirtualKey
from billing.models import (
    Invoice,
    InvoiceLine,
    TeamNotificationSettings,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from core.models import AuditEntry
from gateway.models import ModelAlias, ModelDeployment, ModelGroup
from tests.dashboard.conftest import ROLES, World, month_ago
from tests.support.http import check_each


@dataclass(frozen=True)
class Case:
    method: str
    url: Callable[[World], str]
    expected: str  # statuses in ROLES order
    data: Callable[[World], dict[str, Any]] | None = None

    def statuses(self) -> dict[str, int]:
        codes = [int(code) for code in self.expected.split()]
        assert len(codes) == len(ROLES), self.expected
        return dict(zip(ROLES, codes, strict=True))


def get(url: Callable[[World], str], expected: str) -> Case:
    return Case("GET", url, expected)


def post(
    url: Callable[[World], str],
    expected: str,
    data: Callable[[World], dict[str, Any]] | None = None,
) -> Case:
    return Case("POST", url, expected, data or (lambda w: {}))


def team_form(name: str) -> Callable[[World], dict[str, Any]]:
    return lambda w: {
        "name": name,
        "budget_usd": "250",
        "budget_period": "monthly",
        "timezone": "Europe/Paris",
        "alert_thresholds": "50, 100",
        "markup_percent": "0",
    }


def deployment_form(w: World) -> dict[str, Any]:
    return {
        "name": "gpt-new",
        "provider_model": "openai/gpt-new",
        "api_base": "http://127.0.0.1:9/v1",
        "weight": "1",
        "enabled": "on",
    }


def group_form(w: World) -> dict[str, Any]:
    return {
        "routing_strategy": "least-busy",
        "fallbacks": "gpt-other",
        "num_retries": "1",
        "retry_backoff_seconds": "0.5",
        "max_retry_after_seconds": "10",
        "allowed_fails": "3",
        "cooldown_seconds": "10",
    }


def webhook_form(w: World) -> dict[str, Any]:
    return {
        "url": "https://hooks.acme.example/v2",
        "events": ["budget.exceeded", "invoice.finalized"],
        "description": "ops pager",
        "enabled": "on",
    }


def draft_form(w: World) -> dict[str, Any]:
    year, month = month_ago(3)
    return {"team": w.acme.id, "month": f"{year:04d}-{month:02d}"}


def invoice(w: World, name: str) -> str:
    return f"/invoices/{getattr(w, name).id}/"


def hooks(w: World, suffix: str = "", endpoint: str = "acme_webhook") -> str:
    return f"/teams/{w.acme.id}/webhooks/{getattr(w, endpoint).public_id}/{suffix}"


#                                                              anon root fiona alice bob charlie
CASES: dict[str, Case] = {
    "overview": get(lambda w: "/overview/", "302 200 200 200 200 200"),
    "overview of acme": get(lambda w: f"/overview/?team={w.acme.id}", "302 200 200 200 200 200"),
    # teams
    "teams": get(lambda w: "/teams/", "302 200 200 200 200 200"),
    "team create form": get(lambda w: "/teams/new/", "302 200 403 403 403 403"),
    "team create": post(lambda w: "/teams/new/", "302 302 403 403 403 403", team_form("Initech")),
    "acme page": get(lambda w: f"/teams/{w.acme.id}/", "302 200 200 200 403 404"),
    "acme edit form": get(lambda w: f"/teams/{w.acme.id}/edit/", "302 200 403 403 403 404"),
    "acme edit": post(
        lambda w: f"/teams/{w.acme.id}/edit/", "302 302 403 403 403 404", team_form("Acme 2")
    ),
    "acme member add": post(
        lambda w: f"/teams/{w.acme.id}/members/add/",
        "302 302 403 302 403 404",
        lambda w: {"username": "dave", "role": "member"},
    ),
    "acme member role": post(
        lambda w: f"/teams/{w.acme.id}/members/{w.bob_membership.id}/role/",
        "302 302 403 302 403 404",
        lambda w: {"role": "admin"},
    ),
    "acme member remove": post(
        lambda w: f"/teams/{w.acme.id}/members/{w.bob_membership.id}/remove/",
        "302 302 403 302 403 404",
    ),
    # A membership id of another team, under Acme's URL: not found for Acme's admin.
    "globex member via acme": post(
        lambda w: f"/teams/{w.acme.id}/members/{w.charlie_membership.id}/remove/",
        "302 404 403 404 403 404",
    ),
    # keys
    "keys": get(lambda w: "/keys/", "302 200 200 200 200 200"),
    "key issue form": get(lambda w: "/keys/new/", "302 200 403 200 200 200"),
    "key issue in acme": post(
        lambda w: "/keys/new/",
        "302 201 403 201 201 400",
        lambda w: {"name": "ci", "team": w.acme.id, "budget_period": "monthly"},
    ),
    "bob key page": get(lambda w: f"/keys/{w.bob_key.id}/", "302 200 200 200 200 404"),
    "alice key page": get(lambda w: f"/keys/{w.alice_key.id}/", "302 200 200 200 404 404"),
    "bob key limits form": get(lambda w: f"/keys/{w.bob_key.id}/edit/", "302 200 403 200 403 404"),
    "bob key limits": post(
        lambda w: f"/keys/{w.bob_key.id}/edit/",
        "302 302 403 302 403 404",
        lambda w: {"name": "bob-laptop", "budget_period": "daily", "rpm_limit": "5"},
    ),
    "bob key rotate": post(
        lambda w: f"/keys/{w.bob_key.id}/rotate/",
        "302 200 403 200 200 404",
        lambda w: {"grace_seconds": "3600"},
    ),
    "bob key revoke": post(lambda w: f"/keys/{w.bob_key.id}/revoke/", "302 302 403 302 302 404"),
    "alice key revoke": post(
        lambda w: f"/keys/{w.alice_key.id}/revoke/", "302 302 403 302 404 404"
    ),
    # models
    "models": get(lambda w: "/models/", "302 200 200 403 403 403"),
    "deployment create form": get(lambda w: "/models/new/", "302 200 403 403 403 403"),
    "deployment create": post(lambda w: "/models/new/", "302 302 403 403 403 403", deployment_form),
    "deployment page": get(
        lambda w: f"/models/{w.deployment.public_id}/", "302 200 403 403 403 403"
    ),
    "deployment edit": post(
        lambda w: f"/models/{w.deployment.public_id}/",
        "302 302 403 403 403 403",
        lambda w: {
            "name": "gpt-test",
            "provider_model": "openai/gpt-test",
            "weight": "2",
            "enabled": "on",
        },
    ),
    "deployment test": post(
        lambda w: f"/models/{w.deployment.public_id}/test/", "302 200 403 403 403 403"
    ),
    "deployment delete": post(
        lambda w: f"/models/{w.deployment.public_id}/delete/", "302 302 403 403 403 403"
    ),
    "alias create": post(
        lambda w: "/models/aliases/new/",
        "302 302 403 403 403 403",
        lambda w: {"alias": "gpt-4", "target": "gpt-test"},
    ),
    "alias delete": post(
        lambda w: f"/models/aliases/{w.alias.id}/delete/", "302 302 403 403 403 403"
    ),
    "policy form": get(lambda w: "/models/policy/gpt-test/", "302 200 403 403 403 403"),
    "policy save": post(
        lambda w: "/models/policy/gpt-test/", "302 302 403 403 403 403", group_form
    ),
    "policy reset": post(lambda w: "/models/policy/gpt-test/delete/", "302 302 403 403 403 403"),
    # usage and requests
    "usage": get(lambda w: "/usage/", "302 200 200 200 200 200"),
    "usage by model": get(lambda w: "/usage/?group_by=model", "302 200 200 200 200 200"),
    "usage of bob key": get(lambda w: f"/usage/?key={w.bob_key.id}", "302 200 200 200 200 404"),
    "usage of alice key": get(lambda w: f"/usage/?key={w.alice_key.id}", "302 200 200 200 404 404"),
    "usage csv": get(lambda w: "/usage/export.csv", "302 200 200 200 200 200"),
    "requests": get(lambda w: "/requests/", "302 200 200 200 200 200"),
    "requests of bob key": get(
        lambda w: f"/requests/?key={w.bob_key.id}", "302 200 200 200 200 404"
    ),
    "bob request": get(lambda w: f"/requests/{w.bob_row.id}/", "302 200 200 200 200 404"),
    "charlie request": get(lambda w: f"/requests/{w.charlie_row.id}/", "302 200 200 404 404 200"),
    # invoices
    "invoices": get(lambda w: "/invoices/", "302 200 200 200 403 200"),
    "invoices filtered": get(
        lambda w: f"/invoices/?team={w.acme.id}&status=finalized&period=2026-01",
        "302 200 200 200 403 200",
    ),
    "acme invoice": get(lambda w: invoice(w, "acme_invoice"), "302 200 200 200 403 404"),
    "acme invoice csv": get(
        lambda w: invoice(w, "acme_invoice") + "invoice.csv", "302 200 200 200 403 404"
    ),
    "acme invoice print": get(
        lambda w: invoice(w, "acme_invoice") + "print/", "302 200 200 200 403 404"
    ),
    "acme draft": get(lambda w: invoice(w, "acme_draft"), "302 200 200 404 403 404"),
    "acme draft csv": get(
        lambda w: invoice(w, "acme_draft") + "invoice.csv", "302 200 200 404 403 404"
    ),
    "globex invoice": get(lambda w: invoice(w, "globex_invoice"), "302 200 200 404 404 200"),
    "invoice draft": post(lambda w: "/invoices/draft/", "302 302 302 403 403 403", draft_form),
    "acme draft finalize": post(
        lambda w: invoice(w, "acme_draft") + "finalize/", "302 302 302 404 403 404"
    ),
    "acme invoice void": post(
        lambda w: invoice(w, "acme_invoice") + "void/",
        "302 302 302 403 403 404",
        lambda w: {"reason": "wrong markup"},
    ),
    "globex invoice void": post(
        lambda w: invoice(w, "globex_invoice") + "void/",
        "302 302 302 404 404 403",
        lambda w: {"reason": "wrong markup"},
    ),
    # webhooks and alert recipients
    "acme webhooks": get(lambda w: f"/teams/{w.acme.id}/webhooks/", "302 200 403 200 403 404"),
    "acme webhook form": get(
        lambda w: f"/teams/{w.acme.id}/webhooks/new/", "302 200 403 200 403 404"
    ),
    "acme webhook create": post(
        lambda w: f"/teams/{w.acme.id}/webhooks/new/", "302 201 403 201 403 404", webhook_form
    ),
    "acme webhook page": get(lambda w: hooks(w), "302 200 403 200 403 404"),
    "acme webhook edit": post(lambda w: hooks(w), "302 302 403 302 403 404", webhook_form),
    "acme webhook delete": post(lambda w: hooks(w, "delete/"), "302 302 403 302 403 404"),
    "acme webhook deliveries": get(lambda w: hooks(w, "deliveries/"), "302 200 403 200 403 404"),
    # Globex's endpoint under Acme's URL: not found for whoever may manage Acme's.
    "globex webhook via acme": get(
        lambda w: hooks(w, "", "globex_webhook"), "302 404 403 404 403 404"
    ),
    "globex webhook delete via acme": post(
        lambda w: hooks(w, "delete/", "globex_webhook"), "302 404 403 404 403 404"
    ),
    "globex webhooks": get(lambda w: f"/teams/{w.globex.id}/webhooks/", "302 200 403 404 404 200"),
    "acme alert recipients": post(
        lambda w: f"/teams/{w.acme.id}/alerts/",
        "302 302 403 302 403 404",
        lambda w: {"alert_emails": "ops@acme.example, cfo@acme.example"},
    ),
    # audit and people
    "audit": get(lambda w: "/audit/", "302 200 200 200 403 200"),
    "people": get(lambda w: "/users/", "302 200 403 403 403 403"),
    "person create": post(
        lambda w: "/users/",
        "302 302 403 403 403 403",
        lambda w: {"username": "erin", "password": "a long enough passphrase", "platform_role": ""},
    ),
    "person role": post(
        lambda w: f"/users/{w.dave.id}/role/",
        "302 302 403 403 403 403",
        lambda w: {"platform_role": "finance"},
    ),
    # sign-in
    "login page": get(lambda w: "/login/", "200 302 302 302 302 302"),
    "logout": post(lambda w: "/logout/", "302 302 302 302 302 302"),
}


def state() -> str:
    """A fingerprint of everything a dashboard action could change."""
    parts: list[Any] = [AuditEntry.objects.count()]
    for model in (Team, VirtualKey, KeySecret, ModelDeployment, ModelGroup, ModelAlias):
        parts.append(list(model.objects.order_by("pk").values()))
    parts.append(list(Membership.objects.order_by("pk").values()))
    for billing_model in (
        Invoice,
        InvoiceLine,
        WebhookEndpoint,
        WebhookDelivery,
        WebhookAttempt,
        TeamNotificationSettings,
    ):
        parts.append(list(billing_model.objects.order_by("pk").values()))
    parts.append(list(StaffRole.objects.order_by("pk").values()))
    parts.append(
        list(
            User.objects.order_by("pk").values(
                "id", "username", "email", "password", "is_superuser", "is_staff", "is_active"
            )
        )
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def run_case(world: World, name: str, case: Case, role: str) -> tuple[int, bool, str]:
    """(status, whether anything changed, redirect target) inside a rolled-back savepoint."""
    client = world.client(role)
    with transaction.atomic():
        before = state()
        if case.method == "GET":
            response = client.get(case.url(world))
        else:
            assert case.data is not None
            response = client.post(case.url(world), case.data(world))
        changed = state() != before
        transaction.set_rollback(True)
    return response.status_code, changed, response.get("Location", "")


@pytest.mark.django_db
def test_it_enforces_the_authorisation_matrix(world: World) -> None:
    cells = [
        (name, role, expected)
        for name, case in CASES.items()
        for role, expected in case.statuses().items()
    ]

    def check(cell: tuple[str, str, int]) -> None:
        name, role, expected = cell
        case = CASES[name]
        status, changed, location = run_case(world, name, case, role)
        assert status == expected, f"got {status}, expected {expected}"
        if role == "anon" and expected == 302 and name != "logout":
            assert location.startswith("/login/?next="), location
        refused = expected >= 400 or role == "anon"
        if case.method == "POST" and refused:
            assert not changed, "a refused action changed something"

    check_each(cells, check)
    # The table is the whole dashboard: 72 URLs x 6 roles.
    assert len(CASES) == 72
    assert len(cells) == len(CASES) * len(ROLES)


@pytest.mark.django_db
def test_it_changes_things_when_an_action_is_allowed(world: World) -> None:
    """The other half of the matrix: allowed POSTs really do their job."""
    allowed = [
        (name, role)
        for name, case in CASES.items()
        if case.method == "POST" and name != "logout"
        for role, code in case.statuses().items()
        if role != "anon" and code < 400
    ]

    def check(cell: tuple[str, str]) -> None:
        name, role = cell
        _, changed, _ = run_case(world, name, CASES[name], role)
        if name != "deployment test":  # a test call changes nothing by design
            assert changed, "an allowed action changed nothing"

    check_each(allowed, check)
