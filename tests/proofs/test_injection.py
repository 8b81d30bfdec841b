"""Promise 9: SQL and template payloads are data, never code.

Payloads go into the credentials headers of the data plane and the management API, and
into every string field of every management create/update operation (and the string
query parameters). Each call answers within a second (a `pg_sleep(5)` that ran would
take five), never with a 500, always in the documented error shape; where a value is
accepted it is stored and returned verbatim, and the dashboard shows it escaped, not
evaluated. `ruff`'s security rules (S, as `make lint` runs them) are clean.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from django.utils.html import escape

from tests.support.dashboard import dashboard_login
from tests.support.http import anthropic_error_shape, openai_error_shape
from tests.support.live import ROOT

pytestmark = pytest.mark.e2e

PAYLOADS = (
    "' OR pg_sleep(5)--",
    "'; SELECT pg_sleep(5);--",
    "{{7*7}}",
    "{% debug %}",
    "${7*7}",
    "<script>alert(1)</script>",
)
PASSWORD = "a long and unguessable passphrase"
SLOW = 1.0  # seconds


class Recorder:
    """Sends requests, timing each, and collects every broken promise."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.problems: list[str] = []

    def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        started = time.monotonic()
        response = self.client.request(method, path, **kwargs)
        elapsed = time.monotonic() - started
        label = f"{method} {path} {json.dumps(kwargs.get('json'))[:120]}"
        if elapsed >= SLOW:
            self.problems.append(f"{label}: took {elapsed:.2f}s")
        if response.status_code >= 500:
            self.problems.append(f"{label}: {response.status_code} {response.text[:200]}")
        elif response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            shape = anthropic_error_shape if path.startswith("/v1/messages") else openai_error_shape
            if not shape(body):
                self.problems.append(
                    f"{label}: error not in the documented shape: {response.text[:200]}"
                )
        return response

    def same(self, label: str, found: Any, sent: Any) -> None:
        if found != sent:
            self.problems.append(f"{label}: sent {sent!r}, got back {found!r}")


def test_payloads_in_credential_headers_are_refused_fast_and_cleanly(live_gateway, make_model):
    model = make_model()
    chat = {"model": model.name, "messages": [{"role": "user", "content": "hi"}]}
    messages = {**chat, "max_tokens": 5}
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/v1/key", None),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/messages", messages),
        ("GET", "/api/admin/teams", None),
        ("POST", "/api/admin/teams", {"name": "never"}),
    ]
    with httpx.Client(base_url=live_gateway.url, timeout=30) as client:
        send = Recorder(client)
        for payload in PAYLOADS:
            # With the key prefix too, so the value gets past the prefix check to the lookup.
            for value in (payload, f"sk-gw-{payload}"):
                for headers in (
                    {"authorization": f"Bearer {value}"},
                    {"authorization": value},
                    {"x-api-key": value},
                ):
                    for method, path, body in routes:
                        response = send(method, path, json=body, headers=headers)
                        if response.status_code != 401:
                            send.problems.append(f"{path} {headers}: {response.status_code}")

    assert send.problems == [], "\n".join(send.problems)


def _team(send: Recorder, p: str) -> int:
    metadata = {p: p, "note": p, "nested": {"list": [p]}}
    created = send("POST", "/teams", json={"name": p, "metadata": metadata})
    if created.status_code != 201:
        send.problems.append(f"team {p!r} not created: {created.status_code} {created.text}")
        return 0
    team_id = int(created.json()["id"])
    for shown in (created.json(), send("GET", f"/teams/{team_id}").json()):
        send.same("team name", shown["name"], p)
        send.same("team metadata", shown["metadata"], metadata)
    send("PATCH", f"/teams/{team_id}", json={"timezone": p})  # not a timezone: a 400
    updated = send("PATCH", f"/teams/{team_id}", json={"metadata": {"note": p}})
    send.same("team metadata update", updated.json().get("metadata"), {"note": p})
    send("PUT", f"/teams/{team_id}/notifications", json={"alert_emails": [p]})
    return team_id


def _key(send: Recorder, p: str, team_id: int) -> None:
    body = {"team_id": team_id, "name": p, "metadata": {"k": p, p: p}, "models": [p]}
    created = send("POST", "/keys", json=body)
    if created.status_code != 201:
        send.problems.append(f"key {p!r} not created: {created.status_code} {created.text}")
        return
    key_id = created.json()["id"]
    for shown in (created.json(), send("GET", f"/keys/{key_id}").json()):
        send.same("key name", shown["name"], p)
        send.same("key metadata", shown["metadata"], {"k": p, p: p})
        send.same("key models", shown["models"], [p])
    updated = send("PATCH", f"/keys/{key_id}", json={"name": p, "models": [p, "x"]})
    send.same("key models update", updated.json().get("models"), [p, "x"])


def _model(send: Recorder, p: str, api_base: str) -> str:
    send("POST", "/models", json={"name": f"bad {p}", "provider_model": "openai/x", "api_base": p})
    body = {
        "name": p,
        "provider_model": f"openai/{p}",
        "api_base": f"{api_base}?q={quote(p)}",
        "api_key": p,
        "api_version": p[:64],
    }
    created = send("POST", "/models", json=body)
    if created.status_code != 201:
        send.problems.append(f"model {p!r} not created: {created.status_code} {created.text}")
        return ""
    model_id = created.json()["id"]
    for shown in (created.json(), send("GET", f"/models/{model_id}").json()):
        for field in ("name", "provider_model", "api_base", "api_version"):
            send.same(f"model {field}", shown[field], body[field])
        send.same("model api_key hidden", "api_key" in shown, False)
    updated = send(
        "PATCH", f"/models/{model_id}", json={"provider_model": f"openai/{p}", "name": p}
    )
    send.same("model update", updated.json().get("name"), p)
    send("GET", "/models", params={"name": p})
    return p


def _alias_and_group(send: Recorder, p: str, model: str) -> None:
    alias = f"alias {p}"
    created = send("POST", "/aliases", json={"alias": alias, "target": model})
    send.same("alias", created.json().get("alias"), alias)
    send("POST", "/aliases", json={"alias": f"other {p}", "target": p + " nowhere"})
    if "/" in model:
        # A name with a slash cannot be put in these paths at all: a product bug of its
        # own, proven by test_a_model_or_alias_named_with_a_slash_can_be_managed_by_path.
        return
    name = quote(model, safe="")
    send("PUT", f"/model-groups/{name}", json={"routing_strategy": p})  # not a strategy: a 400
    group = send("PUT", f"/model-groups/{name}", json={"fallbacks": [alias]})
    send.same("group name", group.json().get("name"), model)
    send.same("group fallbacks", group.json().get("fallbacks"), [alias])
    send.same("group read", send("GET", f"/model-groups/{name}").json().get("fallbacks"), [alias])
    send("DELETE", f"/aliases/{quote(p, safe='')}")  # no such alias: a 404


def _webhook(send: Recorder, p: str, team_id: int) -> None:
    send("POST", f"/teams/{team_id}/webhooks", json={"url": p})  # not a URL: a 400
    url = f"https://example.com/hook?q={p}"
    created = send("POST", f"/teams/{team_id}/webhooks", json={"url": url, "description": p})
    if created.status_code != 201:
        send.problems.append(f"webhook {p!r} not created: {created.status_code} {created.text}")
        return
    hook = created.json()["id"]
    send.same("webhook url", created.json()["url"], url)
    send.same("webhook description", created.json()["description"], p)
    updated = send("PATCH", f"/teams/{team_id}/webhooks/{hook}", json={"description": p})
    send.same("webhook update", updated.json().get("description"), p)
    send("GET", f"/teams/{team_id}/webhooks/{quote(p, safe='')}")  # no such webhook: a 404


def _queries(send: Recorder, p: str, team_id: int) -> None:
    send("GET", "/ledger", params={"model": p, "status": p})
    send("GET", "/ledger", params={"model": p, "team_id": team_id})
    window = {"since": "2020-01-01T00:00:00Z", "until": "2030-01-01T00:00:00Z"}
    send("GET", "/usage", params={**window, "model": p, "tag": p})
    send("GET", "/usage", params={**window, "group_by": p})
    send("GET", "/invoices", params={"period": p})
    send("GET", f"/teams/{quote(p, safe='')}")


def _void_reason(send: Recorder, p: str) -> None:
    from accounts import services as account_services
    from billing import invoices

    team = account_services.team_create(name=f"invoiced {uuid.uuid4().hex[:8]}")
    invoice = invoices.invoice_draft(team_id=team.id, year=2024, month=1)
    invoices.invoice_finalize(invoice_id=invoice.id)
    voided = send("POST", f"/invoices/{invoice.id}/void", json={"reason": p})
    send.same("void reason", voided.json().get("void_reason"), p)


def test_payloads_in_every_admin_string_field_are_stored_verbatim_and_never_run(
    live_gateway, mock_upstream
):
    from accounts.models import Team
    from gateway.models import ModelDeployment

    team_ids = {}
    with live_gateway.admin() as admin:
        send = Recorder(admin)
        for p in PAYLOADS:
            team_ids[p] = team_id = _team(send, p)
            _key(send, p, team_id)
            model = _model(send, p, mock_upstream.api_base)
            if model:
                _alias_and_group(send, p, model)
            _webhook(send, p, team_id)
            _queries(send, p, team_id)
            _void_reason(send, p)

    assert send.problems == [], "\n".join(send.problems)
    # Stored as sent, as the database sees it.
    for p, team_id in team_ids.items():
        assert Team.objects.get(id=team_id).name == p
        assert ModelDeployment.objects.filter(name=p).count() == 1


def test_a_model_or_alias_named_with_a_slash_can_be_managed_by_path(live_gateway, make_model):
    """POST /models and /aliases accept names with '/' (as in "meta-llama/Llama-3-70b");
    the routes that take the name in their path must then reach them too."""
    model = make_model(name=f"org-{uuid.uuid4().hex[:6]}/Model-3")
    alias = f"team-{uuid.uuid4().hex[:6]}/default"
    with live_gateway.admin() as admin:
        assert (
            admin.post("/aliases", json={"alias": alias, "target": model.name}).status_code == 201
        )
        group = admin.put(f"/model-groups/{quote(model.name, safe='')}", json={"num_retries": 1})
        read = admin.get(f"/model-groups/{quote(model.name, safe='')}")
        deleted = admin.delete(f"/aliases/{quote(alias, safe='')}")

    assert group.status_code == 200, group.text
    assert read.status_code == 200 and read.json()["num_retries"] == 1, read.text
    assert deleted.status_code == 204, deleted.text


def test_the_dashboard_shows_payloads_escaped_not_evaluated(live_gateway):
    from django.contrib.auth.models import User

    from accounts import services as account_services

    teams = {p: account_services.team_create(name=p) for p in PAYLOADS}
    root = User.objects.create_superuser(f"root-{uuid.uuid4().hex[:8]}", "r@example.com", PASSWORD)
    client = dashboard_login(live_gateway.url, root.username, PASSWORD)
    try:
        listing = client.get("/teams/")
        pages = {p: client.get(f"/teams/{team.id}/") for p, team in teams.items()}
    finally:
        client.close()

    assert listing.status_code == 200
    for p, page in pages.items():
        assert page.status_code == 200, (p, page.status_code)
        title = page.text.split("<title>", 1)[1].split("</title>", 1)[0]
        assert title.startswith(escape(p) + " "), (p, title)
        assert escape(p) in listing.text, p
    braces = pages["{{7*7}}"].text.split("<title>", 1)[1].split("</title>", 1)[0]
    assert "{{7*7}}" in braces and "49" not in braces
    assert "sql_queries" not in pages["{% debug %}"].text  # {% debug %} would dump the context
    assert "<script>alert(1)</script>" not in pages["<script>alert(1)</script>"].text
    assert "<script>alert(1)</script>" not in listing.text


def test_the_security_lint_rules_are_clean():
    """ruff's S rules over the product code, with the project's own configuration (make lint)."""
    found = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--output-format",
            "json",
            "--no-fix",
            "config",
            "gateway",
            "billing",
            "dashboard",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    findings = json.loads(found.stdout or "[]")
    security = [
        f"{f['filename']}:{f['location']['row']} {f['code']} {f['message']}"
        for f in findings
        if str(f.get("code") or "").startswith("S")
    ]
    assert found.returncode in (0, 1), found.stderr
    assert security == []
