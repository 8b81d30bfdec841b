"""The first `make run` (gateway_bootstrap_demo) prints a platform admin's login once."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client


@pytest.mark.django_db
def test_it_creates_the_demo_admin_once_and_the_login_works() -> None:
    out = io.StringIO()
    call_command("gateway_bootstrap_demo", stdout=out)
    first = out.getvalue()
    found = re.search(r"username: (\S+)\n\s+password: (\S+)", first)
    assert found is not None, first
    assert "sk-gw-" in first  # beside the demo key
    username, password = found.groups()
    assert User.objects.get(username=username).is_superuser
    answer = Client().post("/login/", {"username": username, "password": password})
    assert answer.status_code == 302 and answer["Location"] == "/overview/"

    again = io.StringIO()
    call_command("gateway_bootstrap_demo", stdout=again)
    assert "password:" not in again.getvalue()
    assert User.objects.filter(is_superuser=True).count() == 1


@pytest.mark.django_db
def test_it_makes_no_demo_admin_when_a_superuser_exists() -> None:
    User.objects.create_superuser("root", "root@example.com", "correct horse battery staple")
    out = io.StringIO()
    call_command("gateway_bootstrap_demo", stdout=out)
    assert "password:" not in out.getvalue()
    assert User.objects.count() == 1
