"""The identity rules of an SSO sign-in, below the browser: matching, refusals, platform roles."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from accounts import sso
from accounts.models import StaffRole
from core.models import AuditEntry

ISSUER = "https://idp.example.test"


def profile(**claims: Any) -> sso.SsoProfile:
    base = {"iss": ISSUER, "sub": "sub-alice", "email": "alice@example.com"}
    return sso.sso_profile(claims={**base, **claims})


@pytest.fixture(autouse=True)
def oidc(settings: Any) -> None:
    settings.GATEWAY_OIDC_ISSUER = ISSUER
    settings.GATEWAY_OIDC_ADMIN_GROUPS = ["platform-admins"]
    settings.GATEWAY_OIDC_FINANCE_GROUPS = ["finance"]


@pytest.mark.django_db
def test_it_does_not_take_over_an_account_by_an_unverified_email() -> None:
    existing = User.objects.create_user("alice", "alice@example.com", "pw-not-used-here-1")
    user = sso.sso_login(profile=profile(email_verified=False))
    assert user.id != existing.id
    assert user.email == ""  # an unverified address is not kept either
    # The second sign-in finds the same person by `sub`.
    assert sso.sso_login(profile=profile(email_verified=False)).id == user.id


@pytest.mark.django_db
def test_it_refuses_a_deactivated_user() -> None:
    user = sso.sso_login(profile=profile(email_verified=True))
    User.objects.filter(id=user.id).update(is_active=False)
    with pytest.raises(sso.SsoError):
        sso.sso_login(profile=profile(email_verified=True))


@pytest.mark.django_db
def test_it_grants_and_takes_back_platform_roles_from_groups() -> None:
    user = sso.sso_login(profile=profile(groups=["platform-admins", "finance"]))
    user.refresh_from_db()
    assert user.is_superuser and StaffRole.objects.filter(user=user, role="finance").exists()
    user = sso.sso_login(profile=profile(groups=[]))
    user.refresh_from_db()
    assert not user.is_superuser and not StaffRole.objects.filter(user=user).exists()
    assert AuditEntry.objects.filter(actor="sso", object_type="user", action="update").count() == 2


@pytest.mark.django_db
def test_it_leaves_a_superuser_made_by_hand_alone() -> None:
    root = User.objects.create_superuser("root", "root@example.com", "pw-not-used-here-1")
    user = sso.sso_login(
        profile=profile(sub="sub-root", email="root@example.com", email_verified=True)
    )
    assert user.id == root.id
    root.refresh_from_db()
    assert root.is_superuser  # not in platform-admins, but the IdP never granted it
