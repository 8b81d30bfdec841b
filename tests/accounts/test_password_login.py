"""GATEWAY_PASSWORD_LOGIN=false: only SSO signs people in, except a break-glass superuser."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

PASSWORD = "correct horse battery staple"


@pytest.fixture
def sso_only(settings: Any) -> None:
    settings.GATEWAY_OIDC_ISSUER = "https://idp.example.test"
    settings.GATEWAY_PASSWORD_LOGIN = False


def login(username: str) -> Any:
    return Client().post("/login/", {"username": username, "password": PASSWORD})


@pytest.mark.django_db
def test_it_refuses_alices_password_when_only_sso_is_on(sso_only: None) -> None:
    User.objects.create_user("alice", "alice@example.com", PASSWORD)
    page = Client().get("/login/").content.decode()
    assert "Sign in with SSO" in page and "Break-glass" in page
    assert login("alice").status_code == 200  # the form again, with an error


@pytest.mark.django_db
def test_it_lets_the_break_glass_superuser_in(sso_only: None) -> None:
    User.objects.create_superuser("root", "root@example.com", PASSWORD)
    answer = login("root")
    assert answer.status_code == 302 and answer["Location"] == "/overview/"


@pytest.mark.django_db
def test_it_takes_alices_password_by_default() -> None:
    User.objects.create_user("alice", "alice@example.com", PASSWORD)
    assert login("alice").status_code == 302
    assert "Sign in with SSO" not in Client().get("/login/").content.decode()
