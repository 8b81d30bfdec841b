"""SCIM 2.0 as Okta and Microsoft Entra ID speak it (request bodies shaped like their docs).

Each IdP creates a user, puts them in a group that a team maps through `sso_groups`,
deactivates them and reactivates them. A deactivated user's key gets 401 from the
live gateway within the key-cache window, their dashboard session is gone, and
reactivation restores the keys that were active before (a revoked one stays revoked).
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.test import Client
from openai import OpenAI

from accounts import services as account_services
from accounts.models import Membership, VirtualKey
from core.models import AuditEntry
from tests.support.waiting import wait_until

SCIM_TOKEN = "scim-test-token-0123456789"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


@pytest.fixture(autouse=True)
def scim_on(settings: Any) -> None:
    settings.GATEWAY_SCIM_TOKEN = SCIM_TOKEN


class Scim:
    def __init__(self, token: str = SCIM_TOKEN) -> None:
        self.client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")

    def call(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        response = getattr(self.client, method)(
            f"/scim/v2{path}",
            data=json.dumps(body) if body is not None else None,
            content_type="application/scim+json",
        )
        assert response.status_code == status, response.content
        return response.json() if response.content else None


def roles_of(user: User) -> dict[str, str]:
    return {
        m.team.name: m.role for m in Membership.objects.filter(user=user).select_related("team")
    }


# --- Okta ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_provisions_an_okta_user_through_their_lifecycle(make_team: Any) -> None:
    scim = Scim()
    acme = make_team("Acme", sso_groups={"Engineering": "member", "Acme Admins": "admin"})
    # Okta looks the user up before creating them.
    found = scim.call(
        "get", "/Users?filter=userName%20eq%20%22dave%40example.com%22&startIndex=1&count=100"
    )
    assert found["totalResults"] == 0 and found["Resources"] == []
    dave = scim.call(
        "post",
        "/Users",
        {
            "schemas": [USER],
            "userName": "dave@example.com",
            "name": {"givenName": "Dave", "familyName": "Lister"},
            "emails": [{"primary": True, "value": "dave@example.com", "type": "work"}],
            "displayName": "Dave Lister",
            "locale": "en-US",
            "externalId": "00ujl29u0le5T6Aj10h7",
            "groups": [],
            "active": True,
        },
        status=201,
    )
    assert dave["userName"] == "dave@example.com" and dave["active"] is True
    assert dave["externalId"] == "00ujl29u0le5T6Aj10h7"
    again = scim.call("get", '/Users?filter=userName eq "dave@example.com"')
    assert again["totalResults"] == 1 and again["Resources"][0]["id"] == dave["id"]
    # Creating the same userName twice is a conflict, as RFC 7644 says.
    scim.call("post", "/Users", {"schemas": [USER], "userName": "dave@example.com"}, status=409)

    # Okta pushes a group, then its members.
    group = scim.call(
        "post", "/Groups", {"schemas": [GROUP], "displayName": "Engineering", "members": []}, 201
    )
    scim.call(
        "patch",
        f"/Groups/{group['id']}",
        {
            "schemas": [PATCH],
            "Operations": [
                {
                    "op": "replace",
                    "value": {"id": group["id"], "displayName": "Engineering"},
                },
                {
                    "op": "add",
                    "path": "members",
                    "value": [{"value": dave["id"], "display": "dave@example.com"}],
                },
            ],
        },
    )
    user = User.objects.get(username="dave@example.com")
    assert roles_of(user) == {"Acme": "member"}
    listed = scim.call("get", '/Groups?filter=displayName eq "Engineering"')
    assert [m["value"] for m in listed["Resources"][0]["members"]] == [dave["id"]]

    # Deactivation: Okta PATCHes active to false.
    scim.call(
        "patch",
        f"/Users/{dave['id']}",
        {"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": False}}]},
    )
    user.refresh_from_db()
    assert not user.is_active
    scim.call(
        "patch",
        f"/Users/{dave['id']}",
        {"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": True}}]},
    )
    user.refresh_from_db()
    assert user.is_active

    # Removing the member (Okta's path filter) removes the role the group gave.
    scim.call(
        "patch",
        f"/Groups/{group['id']}",
        {
            "schemas": [PATCH],
            "Operations": [{"op": "remove", "path": f'members[value eq "{dave["id"]}"]'}],
        },
    )
    assert roles_of(user) == {}
    actions = set(AuditEntry.objects.filter(actor="scim").values_list("object_type", "action"))
    assert {("user", "create"), ("user", "deactivate"), ("user", "reactivate")} <= actions
    assert {("membership", "create"), ("membership", "delete")} <= actions
    assert acme.id in set(
        AuditEntry.objects.filter(actor="scim", object_type="membership").values_list(
            "team_id", flat=True
        )
    )


# --- Entra ID ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_provisions_an_entra_user_with_entras_quirks(make_team: Any) -> None:
    scim = Scim()
    make_team("Globex", sso_groups={"Globex Admins": "admin"})
    erin = scim.call(
        "post",
        "/Users",
        {
            "schemas": [USER, "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
            "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
            "userName": "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1@contoso.com",
            "active": True,
            "emails": [{"primary": True, "type": "work", "value": "erin@contoso.com"}],
            "meta": {"resourceType": "User"},
            "name": {"formatted": "Erin Hannah", "familyName": "Hannah", "givenName": "Erin"},
            "roles": [],
        },
        status=201,
    )
    by_external = scim.call(
        "get", '/Users?filter=externalId eq "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef"'
    )
    assert by_external["Resources"][0]["id"] == erin["id"]
    # Entra: capitalised ops, path-less value objects.
    scim.call(
        "patch",
        f"/Users/{erin['id']}",
        {
            "schemas": [PATCH],
            "Operations": [
                {"op": "Replace", "value": {"name.familyName": "Hannah-Smith"}},
                {"op": "Add", "path": 'emails[type eq "work"].value', "value": "erin@fabrikam.com"},
            ],
        },
    )
    user = User.objects.get(email="erin@fabrikam.com")
    assert user.last_name == "Hannah-Smith"

    group = scim.call(
        "post",
        "/Groups",
        {
            "schemas": [GROUP],
            "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
            "displayName": "Globex Admins",
            "meta": {"resourceType": "Group"},
        },
        status=201,
    )
    scim.call(
        "patch",
        f"/Groups/{group['id']}",
        {
            "schemas": [PATCH],
            "Operations": [{"op": "Add", "path": "members", "value": [{"value": erin["id"]}]}],
        },
    )
    assert roles_of(user) == {"Globex": "admin"}
    by_name = scim.call("get", '/Groups?filter=displayName eq "Globex Admins"&count=1')
    assert by_name["totalResults"] == 1

    # Entra deactivates with the string "False".
    scim.call(
        "patch",
        f"/Users/{erin['id']}",
        {"schemas": [PATCH], "Operations": [{"op": "Replace", "path": "active", "value": "False"}]},
    )
    user.refresh_from_db()
    assert not user.is_active
    scim.call(
        "patch",
        f"/Users/{erin['id']}",
        {"schemas": [PATCH], "Operations": [{"op": "Replace", "path": "active", "value": "True"}]},
    )
    user.refresh_from_db()
    assert user.is_active

    # Entra removes a member with a value list on the plain "members" path.
    scim.call(
        "patch",
        f"/Groups/{group['id']}",
        {
            "schemas": [PATCH],
            "Operations": [{"op": "Remove", "path": "members", "value": [{"value": erin["id"]}]}],
        },
    )
    assert roles_of(user) == {}
    scim.call("delete", f"/Users/{erin['id']}", status=204)
    scim.call("get", f"/Users/{erin['id']}", status=404)
    user.refresh_from_db()
    assert not user.is_active


# --- The protocol's edges ----------------------------------------------------------------------


@pytest.mark.django_db
def test_it_pages_filters_and_describes_itself() -> None:
    scim = Scim()
    for n in range(5):
        scim.call("post", "/Users", {"schemas": [USER], "userName": f"user{n}@example.com"}, 201)
    page = scim.call("get", "/Users?startIndex=2&count=2")
    assert page["totalResults"] == 5 and page["startIndex"] == 2 and page["itemsPerPage"] == 2
    assert [r["userName"] for r in page["Resources"]] == ["user1@example.com", "user2@example.com"]
    scim.call("get", '/Users?filter=title co "x"', status=400)
    assert scim.call("get", "/ServiceProviderConfig")["patch"]["supported"] is True
    assert {r["id"] for r in scim.call("get", "/ResourceTypes")["Resources"]} == {"User", "Group"}
    assert len(scim.call("get", "/Schemas")["Resources"]) == 2


@pytest.mark.django_db
def test_it_refuses_charlie_without_the_token() -> None:
    Scim("wrong-token").call("get", "/Users", status=401)
    assert Client().get("/scim/v2/Users").status_code == 401


# --- Deactivation against the live gateway -------------------------------------------------------


@pytest.mark.e2e
def test_it_suspends_a_deactivated_users_keys_and_sessions(
    live_gateway: Any, make_model: Any, make_team: Any
) -> None:
    scim = Scim()
    model = make_model()
    team = make_team("Acme")
    created = scim.call("post", "/Users", {"schemas": [USER], "userName": "bob@example.com"}, 201)
    bob = User.objects.get(username="bob@example.com")
    active_key = account_services.key_create(team=team, name="bob's", owner=bob)
    revoked_key = account_services.key_create(team=team, name="old", owner=bob)
    account_services.key_revoke(key=revoked_key.key)
    sdk = OpenAI(base_url=live_gateway.v1, api_key=active_key.secret, max_retries=0)
    sdk.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "hi"}])
    browser = Client()
    browser.force_login(bob)
    assert browser.get("/overview/").status_code == 200

    scim.call(
        "patch",
        f"/Users/{created['id']}",
        {"schemas": [PATCH], "Operations": [{"op": "replace", "path": "active", "value": False}]},
    )

    def refused() -> bool:
        try:
            sdk.chat.completions.create(
                model=model.name, messages=[{"role": "user", "content": "hi"}]
            )
        except openai.AuthenticationError:
            return True
        return False

    # GATEWAY_KEY_CACHE_SECONDS is 0.2 for the live gateway.
    wait_until(refused, timeout=0.2 + 2)
    assert not Session.objects.exists()
    assert browser.get("/overview/").status_code == 302

    scim.call(
        "patch",
        f"/Users/{created['id']}",
        {"schemas": [PATCH], "Operations": [{"op": "replace", "path": "active", "value": True}]},
    )

    def served() -> bool:
        try:
            sdk.chat.completions.create(
                model=model.name, messages=[{"role": "user", "content": "hi"}]
            )
        except openai.AuthenticationError:
            return False
        return True

    wait_until(served, timeout=0.2 + 2)
    assert VirtualKey.objects.get(id=revoked_key.key.id).revoked_at is not None
    assert VirtualKey.objects.get(id=active_key.key.id).suspended_at is None
