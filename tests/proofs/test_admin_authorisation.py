"""Promise 8: only the admin token opens the management API, and no one escalates.

Every operation the live gateway publishes under /api/admin in its OpenAPI schema is
called as five callers: nobody, a team's virtual key, another team's virtual key, a
finance user signed in to the dashboard (session cookie and CSRF token: the management
API takes tokens only), and the admin token. The expected status of each cell is kept in
tests/proofs/expected_admin_matrix.json; a route the schema gains is a failure until it
is added there and given a request below, so a new route cannot be forgotten. Refused
calls must change nothing.

Then the escalation attempts: a virtual key minting keys, a key reading another team's
spend on /v1, and dashboard users promoting themselves. (The dashboard's own page-by-page
matrix is tests/dashboard/test_authorisation_matrix.py.)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connection

from tests.support.dashboard import dashboard_login, dashboard_post
from tests.support.http import openai_error_shape

pytestmark = pytest.mark.e2e

MATRIX_PATH = Path(__file__).with_name("expected_admin_matrix.json")
ROLES = ("anonymous", "team_key", "other_team_key", "finance_session", "admin")
PASSWORD = "a long and unguessable passphrase"


@dataclass
class World:
    team_a: Any
    team_b: Any
    key_a: Any  # IssuedKey
    key_b: Any
    deployment: Any
    group: str
    alias: str
    webhook_id: str
    invoice_id: int
    mock_api_base: str
    make_model: Callable[..., Any]


@dataclass
class Call:
    path: dict[str, Any]
    body: Any = None
    query: dict[str, Any] | None = None


def _closed_month(months_back: int) -> tuple[int, int]:
    # Far enough back that the month is closed in every timezone.
    first = datetime.now(UTC).replace(day=1)
    year, month = first.year, first.month - months_back
    while month < 1:
        year, month = year - 1, month + 12
    return year, month


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def build_world(make_team: Any, make_key: Any, make_model: Any, mock_upstream: Any) -> World:
    from billing import invoices, webhooks
    from gateway import services

    team_a, team_b = make_team(name=_unique("authz-a")), make_team(name=_unique("authz-b"))
    deployment = make_model(name=_unique("authz-gpt"))
    group = services.group_save(name=deployment.name, num_retries=1).name
    alias = services.alias_create(alias=_unique("authz-alias"), target=deployment.name).alias
    hook = webhooks.endpoint_create(team_id=team_a.id, url="https://example.com/hooks")
    year, month = _closed_month(2)
    invoice = invoices.invoice_draft(team_id=team_a.id, year=year, month=month)
    return World(
        team_a=team_a,
        team_b=team_b,
        key_a=make_key(team=team_a, name="a-key"),
        key_b=make_key(team=team_b, name="b-key"),
        deployment=deployment,
        group=group,
        alias=alias,
        webhook_id=hook.endpoint.public_id,
        invoice_id=invoice.id,
        mock_api_base=mock_upstream.api_base,
        make_model=make_model,
    )


# --- one valid request per operation --------------------------------------------------------
# `fresh` is True for the admin's call: operations that destroy or consume their target
# get a new one, so every admin call succeeds on its own.


def _fresh_team(w: World) -> int:

    from accounts import services as account_services

    return int(account_services.team_create(name=_unique("authz-doomed")).id)


def _fresh_key(w: World) -> int:

    from accounts import services as account_services

    return int(account_services.key_create(team=w.team_a, name="doomed").key.id)


def _fresh_deployment(w: World) -> str:
    return str(w.make_model(name=_unique("authz-doomed")).public_id)


def _fresh_group(w: World) -> str:
    from gateway import services

    name = w.make_model(name=_unique("authz-grouped")).name
    return str(services.group_save(name=name, num_retries=0).name)


def _fresh_alias(w: World) -> str:
    from gateway import services

    return str(services.alias_create(alias=_unique("authz-alias"), target=w.deployment.name).alias)


def _fresh_webhook(w: World) -> str:
    from billing import webhooks

    return str(
        webhooks.endpoint_create(
            team_id=w.team_a.id, url="https://example.com/h"
        ).endpoint.public_id
    )


def _fresh_draft(w: World, months_back: int) -> int:
    from billing import invoices

    year, month = _closed_month(months_back)
    return int(invoices.invoice_draft(team_id=_fresh_team(w), year=year, month=month).id)


def _fresh_finalized(w: World) -> int:
    from billing import invoices

    invoice_id = _fresh_draft(w, 3)
    invoices.invoice_finalize(invoice_id=invoice_id)
    return invoice_id


def _window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"since": (now - timedelta(days=2)).isoformat(), "until": now.isoformat()}


M = "/api/admin/models/{model_id}"
T = "/api/admin/teams/{team_id}"
K = "/api/admin/keys/{key_id}"
G = "/api/admin/model-groups/{name}"
I = "/api/admin/invoices/{invoice_id}"  # noqa: E741
H = "/api/admin/teams/{team_id}/webhooks/{webhook_id}"

SPECS: dict[str, Callable[[World, bool], Call]] = {
    "POST /api/admin/models": lambda w, f: Call(
        {},
        {"name": _unique("authz-new"), "provider_model": "openai/x", "api_base": w.mock_api_base},
    ),
    "GET /api/admin/models": lambda w, f: Call({}),
    f"GET {M}": lambda w, f: Call({"model_id": w.deployment.public_id}),
    f"PATCH {M}": lambda w, f: Call({"model_id": w.deployment.public_id}, {"weight": 2}),
    f"PUT {M}": lambda w, f: Call({"model_id": w.deployment.public_id}, {"weight": 3}),
    f"DELETE {M}": lambda w, f: Call(
        {"model_id": _fresh_deployment(w) if f else w.deployment.public_id}
    ),
    "POST /api/admin/teams": lambda w, f: Call({}, {"name": _unique("authz-new")}),
    "GET /api/admin/teams": lambda w, f: Call({}),
    f"GET {T}": lambda w, f: Call({"team_id": w.team_a.id}),
    f"PATCH {T}": lambda w, f: Call({"team_id": w.team_a.id}, {"markup_percent": "1"}),
    f"PUT {T}": lambda w, f: Call({"team_id": w.team_a.id}, {"markup_percent": "2"}),
    f"DELETE {T}": lambda w, f: Call({"team_id": _fresh_team(w) if f else w.team_a.id}),
    "POST /api/admin/keys": lambda w, f: Call({}, {"team_id": w.team_a.id, "name": "minted"}),
    "GET /api/admin/keys": lambda w, f: Call({}),
    f"GET {K}": lambda w, f: Call({"key_id": w.key_a.key.id}),
    f"PATCH {K}": lambda w, f: Call({"key_id": w.key_a.key.id}, {"rpm_limit": 1000}),
    f"PUT {K}": lambda w, f: Call({"key_id": w.key_a.key.id}, {"rpm_limit": 2000}),
    f"DELETE {K}": lambda w, f: Call({"key_id": _fresh_key(w) if f else w.key_a.key.id}),
    f"POST {K}/rotate": lambda w, f: Call({"key_id": _fresh_key(w) if f else w.key_a.key.id}, {}),
    "GET /api/admin/model-groups": lambda w, f: Call({}),
    f"GET {G}": lambda w, f: Call({"name": w.group}),
    f"PUT {G}": lambda w, f: Call({"name": w.group}, {"num_retries": 2}),
    f"DELETE {G}": lambda w, f: Call({"name": _fresh_group(w) if f else w.group}),
    "POST /api/admin/aliases": lambda w, f: Call(
        {}, {"alias": _unique("authz-alias"), "target": w.deployment.name}
    ),
    "GET /api/admin/aliases": lambda w, f: Call({}),
    "DELETE /api/admin/aliases/{alias}": lambda w, f: Call(
        {"alias": _fresh_alias(w) if f else w.alias}
    ),
    f"GET {T}/spend": lambda w, f: Call({"team_id": w.team_a.id}),
    f"GET {K}/spend": lambda w, f: Call({"key_id": w.key_a.key.id}),
    "GET /api/admin/ledger": lambda w, f: Call({}, query={"team_id": w.team_a.id}),
    "GET /api/admin/invoices": lambda w, f: Call({}),
    f"POST {T}/invoices": lambda w, f: Call(
        {"team_id": w.team_a.id}, dict(zip(("year", "month"), _closed_month(4), strict=True))
    ),
    f"GET {I}": lambda w, f: Call({"invoice_id": w.invoice_id}),
    f"POST {I}/finalize": lambda w, f: Call(
        {"invoice_id": _fresh_draft(w, 2) if f else w.invoice_id}
    ),
    f"POST {I}/void": lambda w, f: Call(
        {"invoice_id": _fresh_finalized(w) if f else w.invoice_id}, {"reason": "test"}
    ),
    f"GET {I}/csv": lambda w, f: Call({"invoice_id": w.invoice_id}),
    f"GET {I}/html": lambda w, f: Call({"invoice_id": w.invoice_id}),
    f"POST {T}/webhooks": lambda w, f: Call(
        {"team_id": w.team_a.id}, {"url": "https://example.com/new", "events": []}
    ),
    f"GET {T}/webhooks": lambda w, f: Call({"team_id": w.team_a.id}),
    f"GET {H}": lambda w, f: Call({"team_id": w.team_a.id, "webhook_id": w.webhook_id}),
    f"PATCH {H}": lambda w, f: Call(
        {"team_id": w.team_a.id, "webhook_id": w.webhook_id}, {"description": "patched"}
    ),
    f"PUT {H}": lambda w, f: Call(
        {"team_id": w.team_a.id, "webhook_id": w.webhook_id}, {"description": "put"}
    ),
    f"DELETE {H}": lambda w, f: Call(
        {"team_id": w.team_a.id, "webhook_id": _fresh_webhook(w) if f else w.webhook_id}
    ),
    f"GET {H}/deliveries": lambda w, f: Call({"team_id": w.team_a.id, "webhook_id": w.webhook_id}),
    f"GET {T}/notifications": lambda w, f: Call({"team_id": w.team_a.id}),
    f"PUT {T}/notifications": lambda w, f: Call(
        {"team_id": w.team_a.id}, {"alert_emails": ["ops@example.com"]}
    ),
    f"PATCH {T}/notifications": lambda w, f: Call(
        {"team_id": w.team_a.id}, {"alert_emails": ["finance@example.com"]}
    ),
    "GET /api/admin/usage": lambda w, f: Call({}, query=_window()),
    "GET /api/admin/usage/reconciliations": lambda w, f: Call({}),
    "GET /api/admin/reconciliations/provider": lambda w, f: Call({}),
    "POST /api/admin/usage/reconciliations": lambda w, f: Call({}, _window()),
}


def admin_operations(live_gateway: Any) -> list[str]:
    schema = httpx.get(f"{live_gateway.url}/api/openapi.json", timeout=30).json()
    return sorted(
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        if path.startswith("/api/admin")
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    )


def fingerprint() -> str:
    """Every row of every table a management call could change."""
    parts = []
    with connection.cursor() as cursor:
        for table in sorted(connection.introspection.table_names(cursor)):
            if table in ("django_session", "django_migrations"):
                continue
            quoted = connection.ops.quote_name(table)
            cursor.execute(f"SELECT * FROM {quoted} ORDER BY 1")  # noqa: S608 - introspected names
            parts.append((table, cursor.fetchall()))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def status_matches(expected: str, status: int) -> bool:
    return str(status) == expected or (expected.endswith("xx") and str(status)[0] == expected[0])


def test_the_management_api_answers_only_the_admin_token(
    live_gateway, make_team, make_key, make_model, mock_upstream
):
    from django.contrib.auth.models import User

    from accounts.models import PlatformRole, StaffRole

    matrix = json.loads(MATRIX_PATH.read_text())
    assert tuple(matrix["roles"]) == ROLES
    expected = matrix["routes"]
    published = admin_operations(live_gateway)
    assert published, "the schema lists no /api/admin routes"
    assert sorted(expected) == published, (
        "expected_admin_matrix.json and the OpenAPI schema disagree: "
        f"not in the matrix {sorted(set(published) - set(expected))}, "
        f"no longer published {sorted(set(expected) - set(published))}"
    )
    assert sorted(SPECS) == published, (
        f"no request for {sorted(set(published) - set(SPECS))}; "
        f"stale requests {sorted(set(SPECS) - set(published))}"
    )

    world = build_world(make_team, make_key, make_model, mock_upstream)
    fiona = User.objects.create_user(_unique("fiona"), "fiona@example.com", PASSWORD)
    StaffRole.objects.create(user=fiona, role=PlatformRole.FINANCE)
    finance = dashboard_login(live_gateway.url, fiona.username, PASSWORD)
    callers: dict[str, tuple[dict[str, str], httpx.Client | None]] = {
        "anonymous": ({}, None),
        "team_key": ({"authorization": f"Bearer {world.key_a.secret}"}, None),
        "other_team_key": ({"authorization": f"Bearer {world.key_b.secret}"}, None),
        # The session of a signed-in finance user, CSRF token included.
        "finance_session": ({"x-csrftoken": finance.cookies.get("csrftoken") or ""}, finance),
        "admin": ({"authorization": f"Bearer {live_gateway.env['GATEWAY_ADMIN_TOKEN']}"}, None),
    }
    mismatches: list[str] = []
    plain = httpx.Client(base_url=live_gateway.url, timeout=30)

    def call(operation: str, role: str) -> None:
        method, template = operation.split(" ", 1)
        request = SPECS[operation](world, role == "admin")
        headers, session = callers[role]
        client = session or plain
        response = client.request(
            method,
            template.format(**request.path),
            json=request.body,
            params=request.query,
            headers=headers,
        )
        want = expected[operation][role]
        if not status_matches(want, response.status_code):
            mismatches.append(
                f"{role} {operation}: {response.status_code}, expected {want}: "
                f"{response.text[:200]}"
            )
        elif response.status_code == 401 and not openai_error_shape(response.json()):
            mismatches.append(f"{role} {operation}: 401 not in the error shape: {response.text}")

    before = fingerprint()
    for role in ROLES[:-1]:
        for operation in published:
            call(operation, role)
    assert fingerprint() == before, "a refused management call changed something"
    for operation in published:
        call(operation, "admin")
    plain.close()
    finance.close()

    assert mismatches == [], f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches)
    assert len(published) * len(ROLES) == sum(len(cells) for cells in expected.values())


def test_a_virtual_key_cannot_mint_or_rotate_keys(live_gateway, make_key):
    from accounts.models import KeySecret, VirtualKey

    issued = make_key()
    before = (VirtualKey.objects.count(), KeySecret.objects.count())
    attempts = [
        ("POST", "/api/admin/keys", {"authorization": f"Bearer {issued.secret}"}),
        ("POST", "/api/admin/keys", {"x-api-key": issued.secret}),
        ("POST", "/api/admin/keys", {"authorization": issued.secret}),
        (
            "POST",
            f"/api/admin/keys/{issued.key.id}/rotate",
            {"authorization": f"Bearer {issued.secret}"},
        ),
        ("POST", "/api/admin/teams", {"authorization": f"Bearer {issued.secret}"}),
    ]
    answers = [
        httpx.request(
            method,
            f"{live_gateway.url}{path}",
            json={"team_id": issued.key.team_id, "name": "minted by a key"},
            headers=headers,
            timeout=30,
        )
        for method, path, headers in attempts
    ]

    assert [a.status_code for a in answers] == [401] * len(attempts), [a.text for a in answers]
    assert all(openai_error_shape(a.json()) for a in answers)
    assert (VirtualKey.objects.count(), KeySecret.objects.count()) == before
    assert not any("sk-gw-" in a.text for a in answers)


def test_a_virtual_key_reads_only_its_own_spend(live_gateway, make_team, make_key, make_model):
    from billing.ledger import AttemptRecord, ledger_write
    from billing.pricing import Usage

    a = make_key(team=make_team(name=_unique("spend-a")), name="alpha")
    b = make_key(team=make_team(name=_unique("spend-b")), name=_unique("bravo-secret-name"))
    b_model = _unique("bravo-model")
    now = datetime.now(UTC)
    ledger_write(
        [
            AttemptRecord(
                request_id=_unique("req"),
                attempt=1,
                team_id=b.key.team_id,
                key_id=b.key.id,
                endpoint="chat.completions",
                model=b_model,
                status="success",
                started_at=now - timedelta(seconds=5),
                ended_at=now,
                usage=Usage(prompt_tokens=10, completion_tokens=10),
                list_cost_micro_usd=777_777,
                charged_cost_micro_usd=777_777,
            )
        ]
    )
    bearer = {"authorization": f"Bearer {a.secret}"}
    ids = {"key_id": b.key.id, "team_id": b.key.team_id, "id": b.key.id}

    own = httpx.get(f"{live_gateway.v1}/key", headers=bearer, params=ids, timeout=30)
    assert own.status_code == 200, own.text
    assert own.json()["id"] == a.key.id and own.json()["team"]["id"] == a.key.team_id
    probes = [
        httpx.get(f"{live_gateway.v1}/key/{b.key.id}", headers=bearer, timeout=30),
        httpx.get(
            f"{live_gateway.url}/api/admin/keys/{b.key.id}/spend", headers=bearer, timeout=30
        ),
        httpx.get(
            f"{live_gateway.url}/api/admin/teams/{b.key.team_id}/spend", headers=bearer, timeout=30
        ),
        httpx.get(f"{live_gateway.url}/api/admin/ledger", headers=bearer, params=ids, timeout=30),
        httpx.get(f"{live_gateway.url}/api/admin/usage", headers=bearer, params=ids, timeout=30),
    ]
    assert [p.status_code for p in probes] == [404, 401, 401, 401, 401], [p.text for p in probes]
    for response in [own, *probes]:
        assert b_model not in response.text and b.key.name not in response.text
        assert "0.777777" not in response.text


def test_dashboard_users_cannot_promote_themselves(live_gateway, make_team):
    from django.contrib.auth.models import User

    from accounts.models import Membership, StaffRole, TeamRole

    acme, globex = make_team(name=_unique("acme")), make_team(name=_unique("globex"))
    alice, bob, charlie, dave = (
        User.objects.create_user(_unique(n), f"{n}@example.com", PASSWORD)
        for n in ("alice", "bob", "charlie", "dave")
    )
    Membership.objects.create(user=alice, team=acme, role=TeamRole.ADMIN)
    bob_member = Membership.objects.create(user=bob, team=acme, role=TeamRole.MEMBER)
    charlie_admin = Membership.objects.create(user=charlie, team=globex, role=TeamRole.ADMIN)
    as_alice = dashboard_login(live_gateway.url, alice.username, PASSWORD)
    as_bob = dashboard_login(live_gateway.url, bob.username, PASSWORD)

    # Control: the same sessions and CSRF handling do get an allowed action through.
    allowed = dashboard_post(
        as_alice, f"/teams/{acme.id}/members/add/", {"username": dave.username, "role": "member"}
    )
    assert allowed.status_code == 302, allowed.text[:500]
    assert Membership.objects.filter(user=dave, team=acme, role=TeamRole.MEMBER).exists()

    def state() -> Any:
        return (
            sorted(Membership.objects.values_list("user_id", "team_id", "role")),
            sorted(StaffRole.objects.values_list("user_id", "role")),
            sorted(User.objects.values_list("id", "is_superuser", "is_staff")),
        )

    before = state()
    # The dashboard's rule (dashboard/access.py): what the user may see but not change is
    # a 403; another team's objects (or a membership addressed under the wrong team) are
    # a 404, so their existence is not revealed. Users and roles are platform-admin pages.
    attempts = [
        (as_bob, f"/teams/{acme.id}/members/{bob_member.id}/role/", {"role": "admin"}, 403),
        (
            as_bob,
            f"/teams/{acme.id}/members/add/",
            {"username": bob.username, "role": "admin"},
            403,
        ),
        (as_bob, f"/users/{bob.id}/role/", {"platform_role": "admin"}, 403),
        (as_bob, f"/users/{bob.id}/role/", {"platform_role": "finance"}, 403),
        (
            as_bob,
            "/users/",
            {"username": _unique("bob2"), "password": PASSWORD, "platform_role": "admin"},
            403,
        ),
        (as_alice, f"/users/{alice.id}/role/", {"platform_role": "admin"}, 403),
        (
            as_alice,
            "/users/",
            {"username": _unique("alice2"), "password": PASSWORD, "platform_role": "admin"},
            403,
        ),
        (
            as_alice,
            f"/teams/{globex.id}/members/add/",
            {"username": alice.username, "role": "admin"},
            404,
        ),
        (as_alice, f"/teams/{globex.id}/members/{charlie_admin.id}/role/", {"role": "member"}, 404),
        (as_alice, f"/teams/{acme.id}/members/{charlie_admin.id}/role/", {"role": "member"}, 404),
    ]
    wrong = []
    for client, path, data, expected in attempts:
        response = dashboard_post(client, path, data)
        if response.status_code != expected or "CSRF" in response.text:
            wrong.append(f"{path} {data}: {response.status_code}, not {expected}")

    assert wrong == [], wrong
    assert state() == before, "a refused promotion changed a role"
    assert not User.objects.filter(username__regex=r"^(bob2|alice2)-").exists()
