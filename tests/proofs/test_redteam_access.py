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
from typing import Any

import openai
import pytest
from django.contrib.auth.models import User
from openai import OpenAI

from dashboard.models import Membership, TeamRole
from gateway.models import Team
from tests.support import wait_for
from tests.workers.conftest import celery_workers, worker  # noqa: F401  (real Celery workers)

pytestmark = pytest.mark.e2e


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
    worker,  # noqa: F811
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
