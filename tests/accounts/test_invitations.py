"""Invitations: alice (Acme's admin) invites dave by e-mail; the link works once, for 7 days.

bob (a plain member) cannot invite, and charlie (Globex's admin) cannot invite into Acme.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from accounts import services as account_services
from accounts.models import Invitation, Membership, TeamRole

PASSWORD = "correct horse battery staple"


@pytest.fixture
def acme(db: Any) -> Any:
    acme = account_services.team_create(name="Acme")
    globex = account_services.team_create(name="Globex")
    for name, team, role in (
        ("alice", acme, TeamRole.ADMIN),
        ("bob", acme, TeamRole.MEMBER),
        ("charlie", globex, TeamRole.ADMIN),
    ):
        user = User.objects.create_user(name, f"{name}@example.com", PASSWORD)
        Membership.objects.create(user=user, team=team, role=role)
    return acme


def signed_in(username: str) -> Client:
    client = Client()
    client.force_login(User.objects.get(username=username))
    return client


def invite(client: Client, team_id: int, captured: Any, email: str = "dave@example.com") -> Any:
    with captured(execute=True):
        return client.post(f"/teams/{team_id}/invite/", {"email": email, "role": "admin"})


def test_it_invites_and_the_link_works_once(
    acme: Any, mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    response = invite(signed_in("alice"), acme.id, django_capture_on_commit_callbacks)
    assert response.status_code == 302
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["dave@example.com"]
    link = re.search(r"http://testserver(/invite/\S+/)", mailoutbox[0].body)
    assert link is not None
    invitation = Invitation.objects.get()
    assert invitation.token_hash not in mailoutbox[0].body  # only the hash is stored
    days = (invitation.expires_at - invitation.created_at) / timedelta(days=1)
    assert round(days, 3) == 7

    dave_browser = Client()
    assert dave_browser.get(link.group(1)).status_code == 200
    answer = dave_browser.post(
        link.group(1), {"username": "dave", "password": PASSWORD, "password_again": PASSWORD}
    )
    assert answer.status_code == 302 and answer["Location"] == "/overview/"
    dave = User.objects.get(username="dave")
    assert dave.email == "dave@example.com" and dave.check_password(PASSWORD)
    assert Membership.objects.get(user=dave).role == TeamRole.ADMIN
    assert dave_browser.get("/overview/").status_code == 200

    # The second use is refused, and makes no second account.
    again = Client().post(
        link.group(1), {"username": "dave2", "password": PASSWORD, "password_again": PASSWORD}
    )
    assert again.status_code == 410
    assert not User.objects.filter(username="dave2").exists()


def test_it_refuses_an_expired_link(
    acme: Any, mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    invite(signed_in("alice"), acme.id, django_capture_on_commit_callbacks)
    link = re.search(r"http://testserver(/invite/\S+/)", mailoutbox[0].body)
    assert link is not None
    # Seven days and a second later.
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert Client().get(link.group(1)).status_code == 410
    answer = Client().post(
        link.group(1), {"username": "dave", "password": PASSWORD, "password_again": PASSWORD}
    )
    assert answer.status_code == 410
    assert not User.objects.filter(username="dave").exists()


def test_it_refuses_a_made_up_link(acme: Any) -> None:
    assert Client().get("/invite/not-a-real-token/").status_code == 410


def test_it_lets_only_team_admins_invite(
    acme: Any, mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    assert invite(signed_in("bob"), acme.id, django_capture_on_commit_callbacks).status_code == 403
    charlie = invite(signed_in("charlie"), acme.id, django_capture_on_commit_callbacks)
    assert charlie.status_code == 404
    assert Client().post(f"/teams/{acme.id}/invite/", {"email": "x@example.com"}).status_code == 302
    assert not Invitation.objects.exists() and mailoutbox == []
