"""No secret is readable in plaintext later: provider keys are encrypted, key secrets hashed."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from django.db import connection
from openai import OpenAI

pytestmark = pytest.mark.e2e


def table_dump() -> dict[str, str]:
    """Every row of every table in the database, as text, by table name."""
    dump: dict[str, str] = {}
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            quoted = connection.ops.quote_name(table)
            cursor.execute(f"SELECT * FROM {quoted}")  # noqa: S608 - names come from introspection
            dump[table] = "\n".join(repr(row) for row in cursor.fetchall())
    return dump


def tables_containing(needle: str) -> list[str]:
    return [table for table, text in table_dump().items() if needle in text]


def test_it_encrypts_a_provider_api_key_at_rest(live_gateway, mock_upstream, make_key):
    provider_key = f"sk-test-canary-{uuid.uuid4()}"
    name = f"encrypted-{uuid.uuid4().hex[:8]}"
    issued = make_key()

    with live_gateway.admin() as admin:
        created = admin.post(
            "/models",
            json={
                "name": name,
                "provider_model": f"openai/{name}",
                "api_base": mock_upstream.api_base,
                "api_key": provider_key,
            },
        )
    assert created.status_code == 201, created.text
    # The stored credential still works: the data plane can decrypt and use it.
    reply = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0).chat.completions
    answer = reply.create(model=name, messages=[{"role": "user", "content": "Hi"}])
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT api_key_encrypted FROM gateway_modeldeployment WHERE name = %s", [name]
        )
        [(stored,)] = cursor.fetchall()

    assert answer.choices[0].message.content
    assert stored, "the api key was not stored at all"
    assert provider_key not in stored
    assert provider_key.split("-")[-1] not in stored
    assert tables_containing(provider_key) == []
    assert provider_key not in live_gateway.log()


def test_it_encrypts_a_provider_api_key_changed_by_an_update(live_gateway, make_model):
    model = make_model()
    provider_key = f"sk-test-canary-{uuid.uuid4()}"

    with live_gateway.admin() as admin:
        patched = admin.patch(f"/models/{model.public_id}", json={"api_key": provider_key})

    assert patched.status_code == 200, patched.text
    assert patched.json()["has_api_key"] is True
    assert provider_key not in patched.text
    assert tables_containing(provider_key) == []


def test_it_stores_key_secrets_only_as_sha256(live_gateway, make_model, make_team):
    model = make_model()
    team = make_team()

    with live_gateway.admin() as admin:
        created = admin.post("/keys", json={"team_id": team.id, "name": "hashed"}).json()
        rotated = admin.post(f"/keys/{created['id']}/rotate", json={"grace_period_seconds": 60})
    secrets = [created["key"], rotated.json()["key"]]
    client = OpenAI(base_url=live_gateway.v1, api_key=secrets[1], max_retries=0)
    client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Hi"}])
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT secret_hash FROM gateway_keysecret WHERE key_id = %s", [created["id"]]
        )
        stored = {row[0] for row in cursor.fetchall()}

    assert stored == {hashlib.sha256(secret.encode()).hexdigest() for secret in secrets}
    for secret in secrets:
        assert tables_containing(secret) == []
        assert tables_containing(secret[6:]) == []
        assert secret not in live_gateway.log()
