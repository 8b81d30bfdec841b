"""Single sign-on end to end: Chromium, our login page, a real IdP's form, the dashboard.

alice is in the IdP groups `acme-admins` and `globex-eng`: she lands as Acme's admin and
Globex's member. Then the IdP moves her from `acme-admins` to `acme-eng`, drops
`globex-eng` and adds `platform-admins`: at her next sign-in she is a plain member of
Acme, out of Globex, and a platform admin. A membership bob was given by hand in a team
without groups is left alone. Every grant and removal is in the audit log as "sso".
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from accounts import services as account_services
from accounts.models import Membership, TeamRole
from core.models import AuditEntry
from tests.accounts.conftest import SsoSite
from tests.dashboard.test_browser_e2e import CHROMIUM, CHROMIUM_ARGS, in_thread

pytestmark = pytest.mark.e2e

PASSWORD = "alice-idp-password"


def sign_in(page: Any, site: SsoSite) -> None:
    page.goto(f"{site.gateway.url}/login/")
    page.get_by_text("Sign in with SSO").click()
    page.wait_for_url(f"{site.idp.issuer}/interaction/**")
    page.fill("#idp-login", "alice")
    page.fill("#idp-password", PASSWORD)
    page.click("#idp-submit")
    page.wait_for_url(f"{site.gateway.url}/overview/")


def sign_out(page: Any, site: SsoSite) -> None:
    page.get_by_role("button", name="Sign out").click()
    # The IdP's RP-initiated logout asks for confirmation, then sends us back.
    page.wait_for_url(f"{site.idp.issuer}/session/end**")
    page.get_by_role("button", name="Yes, sign me out").click()
    page.wait_for_url(f"{site.gateway.url}/login/**")


def roles_of(user: User) -> dict[str, str]:
    return {
        m.team.name: m.role for m in Membership.objects.filter(user=user).select_related("team")
    }


def test_it_signs_in_with_sso_and_follows_group_changes(sso_site: SsoSite) -> None:
    from playwright.sync_api import sync_playwright

    acme = account_services.team_create(
        name="Acme", sso_groups={"acme-admins": "admin", "acme-eng": "member"}
    )
    account_services.team_create(name="Globex", sso_groups={"globex-eng": "member"})
    initech = account_services.team_create(name="Initech")
    sso_site.idp.set_user(
        "alice", password=PASSWORD, email="alice@example.com", groups=["acme-admins", "globex-eng"]
    )
    # alice was added to Initech by hand before SSO: no group touches that.
    alice_before = User.objects.create_user("alice.local", email="alice@example.com")
    Membership.objects.create(user=alice_before, team=initech, role=TeamRole.MEMBER)
    pages: dict[str, str] = {}

    def first_visit() -> None:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            sign_in(page, sso_site)
            pages["first"] = page.content()
            sign_out(page, sso_site)
            # The dashboard session is gone.
            page.goto(f"{sso_site.gateway.url}/overview/")
            pages["after_logout_url"] = page.url
            browser.close()

    in_thread(first_visit)
    assert "alice.local" in pages["first"]
    assert "/login/" in pages["after_logout_url"]
    # Matched by verified e-mail: the existing account, not a new one.
    alice = User.objects.get(email="alice@example.com")
    assert alice.id == alice_before.id
    assert roles_of(alice) == {"Acme": "admin", "Globex": "member", "Initech": "member"}
    assert not alice.is_superuser

    sso_site.idp.set_user(
        "alice",
        password=PASSWORD,
        email="alice@example.com",
        groups=["acme-eng", "platform-admins"],
    )

    def second_visit() -> None:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            sign_in(page, sso_site)
            pages["second"] = page.content()
            browser.close()

    in_thread(second_visit)
    alice.refresh_from_db()
    assert roles_of(alice) == {"Acme": "member", "Initech": "member"}
    assert alice.is_superuser
    assert User.objects.filter(email="alice@example.com").count() == 1

    sso_audit = list(
        AuditEntry.objects.filter(actor="sso").values_list("object_type", "action", "team_id")
    )
    assert ("membership", "create", acme.id) in sso_audit
    assert ("membership", "update", acme.id) in sso_audit  # admin → member
    assert sum(1 for e in sso_audit if e[:2] == ("membership", "delete")) == 1  # Globex
    assert ("user", "update", None) in sso_audit  # platform admin granted


def test_it_refuses_a_callback_this_browser_did_not_start(sso_site: SsoSite) -> None:
    import httpx

    answer = httpx.get(f"{sso_site.gateway.url}/sso/callback/?code=stolen&state=forged")
    assert answer.status_code == 403
    assert "not started here" in answer.text
    assert not User.objects.exists()
