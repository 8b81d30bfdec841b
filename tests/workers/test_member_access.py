"""Red team, issue #12 item 12: team admins constrain their members.

Personas: alice is the admin of a team, bob and erin are members of it, charlie is
the admin of another team. Files and batches belong to the key that made them and to
that key's owner: bob's other key sees bob's, erin's does not, alice's (a team admin)
sees the whole team's, charlie's nothing. A team's key policy caps what its members
may give their keys, and the service (not the form) refuses anything past it.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import openai
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from openai import OpenAI

from accounts.models import Membership, Team, TeamRole, VirtualKey
from core.models import AuditEntry
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def make_model(make_model: Any) -> Any:
    """These tests are about batches run live, line by line: their models opt out of
    native batches (which tests/workers/test_native_batches.py covers)."""

    def make(*args: Any, **fields: Any) -> Any:
        fields.setdefault("capabilities", {"native_batches": False})
        return make_model(*args, **fields)

    return make


@dataclass
class People:
    team: Team
    other_team: Team
    alice: User  # team admin
    bob: User  # member
    erin: User  # member
    charlie: User  # admin of the other team


def _user(name: str) -> User:
    return User.objects.create_user(f"{name}-{uuid.uuid4().hex[:6]}", password="pw-" + name)


@pytest.fixture
def people(make_team: Any) -> People:
    team, other = make_team(), make_team()
    alice, bob, erin, charlie = (_user(n) for n in ("alice", "bob", "erin", "charlie"))
    Membership.objects.create(user=alice, team=team, role=TeamRole.ADMIN)
    Membership.objects.create(user=bob, team=team, role=TeamRole.MEMBER)
    Membership.objects.create(user=erin, team=team, role=TeamRole.MEMBER)
    Membership.objects.create(user=charlie, team=other, role=TeamRole.ADMIN)
    return People(team, other, alice, bob, erin, charlie)


def _sdk(live_gateway: Any, secret: str) -> OpenAI:
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


def _lines(model: str) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]},
            }
        ).encode()
        + b"\n"
        for i in range(2)
    )


# --- files and batches belong to their key's owner -------------------------------------------


def _assert_sees_nothing(sdk: OpenAI, file_id: str, output_id: str, batch_id: str) -> None:
    """Every read, list, download, cancel, delete and reuse is a 404 or an empty list."""
    for call in (
        lambda: sdk.files.retrieve(file_id),
        lambda: sdk.files.content(file_id),
        lambda: sdk.files.content(output_id),
        lambda: sdk.files.retrieve(output_id),
        lambda: sdk.files.delete(file_id),
        lambda: sdk.batches.retrieve(batch_id),
        lambda: sdk.batches.cancel(batch_id),
        lambda: sdk.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert sdk.files.list().data == []
    assert sdk.batches.list().data == []
    assert sdk.files.list(after=file_id).data == []


def test_it_shows_a_members_files_and_batches_only_to_their_keys_and_the_team_admins(
    worker,
    live_gateway,
    make_model,
    make_key,
    people: People,
):
    model = make_model()
    bob = _sdk(live_gateway, make_key(team=people.team, owner=people.bob).secret)
    bob_other = _sdk(live_gateway, make_key(team=people.team, owner=people.bob).secret)
    erin = _sdk(live_gateway, make_key(team=people.team, owner=people.erin).secret)
    alice = _sdk(live_gateway, make_key(team=people.team, owner=people.alice).secret)
    ownerless = _sdk(live_gateway, make_key(team=people.team).secret)  # a management-API key
    charlie = _sdk(live_gateway, make_key(team=people.other_team, owner=people.charlie).secret)

    uploaded = bob.files.create(file=("in.jsonl", io.BytesIO(_lines(model.name))), purpose="batch")
    batch = bob.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(
        lambda: (b := bob.batches.retrieve(batch.id)).status == "completed" and b,
        60,
        0.3,
        "bob's batch to complete",
    )
    output_id = done.output_file_id
    assert output_id is not None

    # Another member of the same team, a key without an owner, another team's admin:
    # every read, list, download, cancel, delete and reuse is a 404 or an empty list.
    for outsider in (erin, ownerless, charlie):
        _assert_sees_nothing(outsider, uploaded.id, output_id, batch.id)

    # Bob's keys, and the team admin's, see it all.
    expected = [json.loads(line)["custom_id"] for line in _lines(model.name).splitlines()]
    for reader in (bob, bob_other, alice):
        assert reader.batches.retrieve(batch.id).output_file_id == output_id
        results = reader.files.content(output_id).text.splitlines()
        assert sorted(json.loads(r)["custom_id"] for r in results) == expected
        assert {f.id for f in reader.files.list().data} == {uploaded.id, output_id}
        assert [b.id for b in reader.batches.list().data] == [batch.id]

    # A file of the team admin's own is not shown to the members.
    admins = alice.files.create(file=("a.jsonl", io.BytesIO(_lines(model.name))), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(admins.id)
    # Bob's other key may delete bob's file; then nobody sees it.
    assert bob_other.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(uploaded.id)


# --- the team's member key policy ------------------------------------------------------------


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _when(days: float) -> str:
    return (timezone.now() + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M")


@pytest.fixture
def policy(people: People, make_model: Any) -> tuple[str, str]:
    """Alice (team admin) sets the policy through the dashboard: $5/month, 60 rpm, 30 days."""
    cheap, dear = make_model().name, make_model().name
    form = {
        "member_key_max_budget_usd": "5",
        "member_key_max_rpm": "60",
        "member_key_max_lifetime_days": "30",
        "member_key_allowed_models": [cheap],
    }
    # A member may not set it, however the form is posted.
    assert _client(people.bob).post(f"/teams/{people.team.id}/key-policy/", form).status_code == 403
    response = _client(people.alice).post(f"/teams/{people.team.id}/key-policy/", form)
    assert response.status_code == 302, response.content[:2000]
    people.team.refresh_from_db()
    assert people.team.member_key_max_budget_micro_usd == 5_000_000
    assert people.team.member_key_allowed_models == [cheap]
    entry = AuditEntry.objects.filter(object_type="team", object_id=str(people.team.id)).latest(
        "id"
    )
    assert entry.actor == people.alice.username and entry.action == "update"
    assert entry.before is not None and entry.before["member_key_max_rpm"] is None
    assert entry.after is not None and entry.after["member_key_max_rpm"] == 60
    return cheap, dear


def _valid_key_form(people: People, cheap: str, **changes: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": "bob-key",
        "team": people.team.id,
        "max_budget_usd": "5",
        "budget_period": "monthly",
        "rpm_limit": "60",
        "allowed_models": [cheap],
        "expires_at": _when(29),
    }
    form.update(changes)
    return {k: v for k, v in form.items() if v is not None}


def test_it_refuses_a_members_key_past_the_team_policy_whatever_the_form_posts(
    people: People, policy: tuple[str, str]
):
    cheap, dear = policy
    bob = _client(people.bob)
    attacks: dict[str, tuple[dict[str, Any], str]] = {
        "no budget": ({"max_budget_usd": ""}, "a budget of at most $5.00 per monthly"),
        "a bigger budget": ({"max_budget_usd": "5.01"}, "this key has $5.01"),
        "a daily budget": ({"budget_period": "daily"}, "monthly or longer, not daily"),
        "no rpm limit": ({"rpm_limit": ""}, "at most 60 requests per minute"),
        "a higher rpm": ({"rpm_limit": "61"}, "this key has 61"),
        "no expiry": ({"expires_at": ""}, "expire within 30 days"),
        "a longer life": ({"expires_at": _when(31)}, "expire within 30 days"),
        "every model": ({"allowed_models": []}, "it allows every model"),
        "a disallowed model": ({"allowed_models": [cheap, dear]}, f"{dear} is not"),
    }
    for attack, (changes, message) in attacks.items():
        response = bob.post("/keys/new/", _valid_key_form(people, cheap, **changes))
        assert response.status_code == 400, attack
        assert message in response.content.decode(), (attack, message)
        assert not VirtualKey.objects.filter(team=people.team, owner=people.bob).exists(), attack

    # Within the caps it is issued; the team admin is not bound by them.
    assert bob.post("/keys/new/", _valid_key_form(people, cheap)).status_code == 201
    alice = _client(people.alice)
    big = _valid_key_form(people, cheap, max_budget_usd="500", expires_at="", allowed_models=[])
    assert alice.post("/keys/new/", {**big, "name": "alice-key"}).status_code == 201
    assert VirtualKey.objects.get(owner=people.alice).max_budget_micro_usd == 500_000_000


def test_it_refuses_a_member_editing_or_rotating_their_key_past_the_caps(
    people: People, policy: tuple[str, str]
):
    cheap, dear = policy
    bob = _client(people.bob)
    assert bob.post("/keys/new/", _valid_key_form(people, cheap)).status_code == 201
    key = VirtualKey.objects.get(owner=people.bob)
    edit = {
        "name": key.name,
        "max_budget_usd": "5",
        "budget_period": "monthly",
        "rpm_limit": "60",
        "allowed_models": [cheap],
        "expires_at": key.expires_at.strftime("%Y-%m-%dT%H:%M") if key.expires_at else "",
    }
    for changes, message in (
        ({"max_budget_usd": "50"}, "this key has $50.00"),
        ({"max_budget_usd": ""}, "this key has none"),
        ({"allowed_models": [dear]}, f"{dear} is not"),
        ({"rpm_limit": "1000"}, "this key has 1000"),
        ({"expires_at": ""}, "expire within 30 days"),
        # Lifetime counts from creation: pushing the expiry on is no way round it.
        ({"expires_at": _when(30.5)}, "expire within 30 days"),
    ):
        response = bob.post(f"/keys/{key.id}/edit/", {**edit, **changes})
        assert response.status_code == 400, changes
        assert message in response.content.decode(), changes
        fresh = VirtualKey.objects.get(id=key.id)
        assert fresh.max_budget_micro_usd == 5_000_000 and fresh.allowed_models == [cheap]
        assert fresh.rpm_limit == 60 and fresh.expires_at == key.expires_at
    assert bob.post(f"/keys/{key.id}/edit/", {**edit, "max_budget_usd": "4"}).status_code == 302
    assert VirtualKey.objects.get(id=key.id).max_budget_micro_usd == 4_000_000

    # Another member's key is not bob's to change.
    erin_key = VirtualKey.objects.create(team=people.team, owner=people.erin, name="erin")
    assert bob.post(f"/keys/{erin_key.id}/edit/", edit).status_code == 404

    # The policy tightens: bob may not rotate a key now past it; the team admin may
    # still change it past the caps, and rotate it.
    from accounts import services as account_services

    account_services.team_update(team=people.team, member_key_max_budget_micro_usd=1_000_000)
    secrets_before = key.secrets.count()
    response = bob.post(f"/keys/{key.id}/rotate/", {"grace_seconds": "0"}, follow=True)
    assert "a budget of at most $1.00" in response.content.decode()
    assert key.secrets.count() == secrets_before
    alice = _client(people.alice)
    assert alice.post(f"/keys/{key.id}/edit/", {**edit, "max_budget_usd": "50"}).status_code == 302
    assert alice.post(f"/keys/{key.id}/rotate/", {"grace_seconds": "0"}).status_code == 200
    assert key.secrets.count() == secrets_before + 1


def test_it_sets_and_shows_the_policy_through_the_management_api(live_gateway, make_team):
    team = make_team()
    with live_gateway.admin() as admin:
        response = admin.patch(
            f"/teams/{team.id}",
            json={
                "member_key_max_budget_usd": "2.50",
                "member_key_max_tpm": 1000,
                "member_key_allowed_models": ["a", "b"],
                "member_key_max_lifetime_days": 7,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["member_key_max_budget_usd"] == "2.500000"
        assert body["member_key_allowed_models"] == ["a", "b"]
        assert body["member_key_max_rpm"] is None and body["member_key_max_lifetime_days"] == 7
        bad = admin.patch(f"/teams/{team.id}", json={"member_key_max_rpm": 0})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == "member_key_max_rpm", bad.text
        cleared = admin.patch(f"/teams/{team.id}", json={"member_key_allowed_models": None})
        assert cleared.json()["member_key_allowed_models"] == []
    team.refresh_from_db()
    assert team.member_key_max_budget_micro_usd == 2_500_000
