"""Virtual keys over their life: issued, used, restricted, rotated, expired and revoked."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from tests.support.http import assert_openai_error, chat
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Hello"}]
# Revocations and rotations must reach the data plane within this many seconds.
PROPAGATION_SECONDS = 2.0


def body_for(model_name: str) -> dict:
    return {"model": model_name, "messages": HELLO}


def issue_key(live_gateway, team_id: int, **fields) -> dict:
    with live_gateway.admin() as admin:
        response = admin.post("/keys", json={"team_id": team_id, "name": "svc", **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


def refused(live_gateway, secret: str, model_name: str) -> bool:
    response = chat(live_gateway.v1, secret, body_for(model_name))
    if response.status_code == 200:
        return False
    assert_openai_error(response, 401, code="invalid_api_key")
    return True


def test_it_refuses_a_key_within_two_seconds_of_its_revocation(live_gateway, make_model, make_team):
    model = make_model()
    team = make_team()
    created = issue_key(live_gateway, team.id)
    # Used first, so whatever the gateway caches about the key is warm.
    assert chat(live_gateway.v1, created["key"], body_for(model.name)).status_code == 200

    with live_gateway.admin() as admin:
        revoked = admin.delete(f"/keys/{created['id']}")
    revoked_at = time.monotonic()
    wait_until(lambda: refused(live_gateway, created["key"], model.name), PROPAGATION_SECONDS)

    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked"] is True
    assert time.monotonic() - revoked_at <= PROPAGATION_SECONDS + 0.5
    # And it stays refused.
    time.sleep(0.3)
    assert refused(live_gateway, created["key"], model.name)


def test_it_keeps_a_revoked_key_out_of_models_too(live_gateway, make_model, make_team):
    make_model()
    team = make_team()
    created = issue_key(live_gateway, team.id)
    auth = {"authorization": f"Bearer {created['key']}"}
    assert httpx.get(f"{live_gateway.v1}/models", headers=auth).status_code == 200

    with live_gateway.admin() as admin:
        admin.delete(f"/keys/{created['id']}")

    def models_refused() -> bool:
        return httpx.get(f"{live_gateway.v1}/models", headers=auth).status_code == 401

    wait_until(models_refused, PROPAGATION_SECONDS)
    response = httpx.get(f"{live_gateway.v1}/models", headers=auth)
    assert_openai_error(response, 401, code="invalid_api_key")


def test_it_rotates_a_key_without_grace_and_refuses_the_old_secret(
    live_gateway, make_model, make_team
):
    model = make_model()
    team = make_team()
    created = issue_key(live_gateway, team.id)
    old = created["key"]
    assert chat(live_gateway.v1, old, body_for(model.name)).status_code == 200

    with live_gateway.admin() as admin:
        rotated = admin.post(f"/keys/{created['id']}/rotate", json={"grace_period_seconds": 0})

    assert rotated.status_code == 201, rotated.text
    new = rotated.json()["key"]
    assert new.startswith("sk-gw-")
    assert len(new) >= 6 + 43
    assert new != old
    assert rotated.json()["id"] == created["id"]
    wait_until(lambda: refused(live_gateway, old, model.name), PROPAGATION_SECONDS)
    assert chat(live_gateway.v1, new, body_for(model.name)).status_code == 200


def test_it_keeps_the_old_secret_working_during_the_grace_period(
    live_gateway, make_model, make_team
):
    model = make_model()
    team = make_team()
    created = issue_key(live_gateway, team.id)
    old = created["key"]
    assert chat(live_gateway.v1, old, body_for(model.name)).status_code == 200

    with live_gateway.admin() as admin:
        rotated = admin.post(f"/keys/{created['id']}/rotate", json={"grace_period_seconds": 60})
    new = rotated.json()["key"]
    # Past the key cache interval, so what is served is the rotated state.
    time.sleep(0.5)

    assert rotated.status_code == 201, rotated.text
    assert chat(live_gateway.v1, old, body_for(model.name)).status_code == 200
    assert chat(live_gateway.v1, new, body_for(model.name)).status_code == 200


def test_it_refuses_to_rotate_a_revoked_key(live_gateway, make_team):
    team = make_team()
    created = issue_key(live_gateway, team.id)

    with live_gateway.admin() as admin:
        admin.delete(f"/keys/{created['id']}")
        response = admin.post(f"/keys/{created['id']}/rotate", json={"grace_period_seconds": 0})

    assert_openai_error(response, 400, type="invalid_request_error")


def test_it_refuses_to_rotate_or_revoke_a_key_that_does_not_exist(live_gateway):
    with live_gateway.admin() as admin:
        rotated = admin.post("/keys/987654321/rotate", json={"grace_period_seconds": 0})
        revoked = admin.delete("/keys/987654321")

    assert_openai_error(rotated, 404)
    assert_openai_error(revoked, 404)


def test_it_refuses_a_negative_grace_period(live_gateway, make_team):
    team = make_team()
    created = issue_key(live_gateway, team.id)

    with live_gateway.admin() as admin:
        response = admin.post(f"/keys/{created['id']}/rotate", json={"grace_period_seconds": -5})

    assert_openai_error(response, 400, param="grace_period_seconds")


def test_it_limits_a_key_to_its_models(live_gateway, make_model, make_team, mock_upstream):
    allowed = make_model()
    other = make_model()
    team = make_team()
    created = issue_key(live_gateway, team.id, models=[allowed.name])

    ok = chat(live_gateway.v1, created["key"], body_for(allowed.name))
    refused_model = chat(live_gateway.v1, created["key"], body_for(other.name))

    assert ok.status_code == 200, ok.text
    assert_openai_error(refused_model, 403, code="model_not_allowed", type="permission_error")
    assert mock_upstream.calls(other.name) == 0


def test_it_refuses_a_key_issued_already_expired(live_gateway, make_model, make_team):
    model = make_model()
    team = make_team()
    created = issue_key(
        live_gateway, team.id, expires_at=(timezone.now() - timedelta(hours=1)).isoformat()
    )

    response = chat(live_gateway.v1, created["key"], body_for(model.name))

    assert_openai_error(response, 401, code="invalid_api_key")


def test_it_refuses_a_key_once_an_admin_sets_its_expiry_in_the_past(
    live_gateway, make_model, make_team
):
    model = make_model()
    team = make_team()
    created = issue_key(
        live_gateway, team.id, expires_at=(timezone.now() + timedelta(days=1)).isoformat()
    )
    assert chat(live_gateway.v1, created["key"], body_for(model.name)).status_code == 200

    with live_gateway.admin() as admin:
        patched = admin.patch(
            f"/keys/{created['id']}",
            json={"expires_at": (timezone.now() - timedelta(seconds=1)).isoformat()},
        )

    assert patched.status_code == 200, patched.text
    wait_until(lambda: refused(live_gateway, created["key"], model.name), PROPAGATION_SECONDS)


def test_it_revokes_one_teams_key_without_affecting_another_teams(
    live_gateway, make_model, make_team
):
    model = make_model()
    alice = issue_key(live_gateway, make_team().id)
    bob = issue_key(live_gateway, make_team().id)

    with live_gateway.admin() as admin:
        admin.delete(f"/keys/{bob['id']}")

    wait_until(lambda: refused(live_gateway, bob["key"], model.name), PROPAGATION_SECONDS)
    assert chat(live_gateway.v1, alice["key"], body_for(model.name)).status_code == 200
