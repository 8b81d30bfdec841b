"""Single sign-on (OpenID Connect) and the IdP groups that set people's roles.

The protocol is Authlib's (authlib.integrations.django_client): endpoints from the
issuer's discovery document, the authorization code flow with PKCE (S256), `state`
and `nonce` kept in the session, and the ID token's signature checked against the
IdP's JWKS (fetched again when a new key id appears). This module adds what Authlib
leaves to the application: the exact issuer and audience the token must carry, a
refusal when no ID token comes back, users created just in time, and the groups →
roles sync that every SSO login (and SCIM, accounts/scim.py) applies.

Every grant and removal is audited with the actor "sso" (or "scim").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from authlib.integrations.django_client import DjangoOAuth2App, OAuth
from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from accounts.models import (
    Membership,
    PlatformRole,
    StaffRole,
    Team,
    TeamRole,
    UserIdentity,
)
from core.audit import audit

log = logging.getLogger(__name__)

# Allowed clock skew when checking exp and iat, in seconds.
ID_TOKEN_LEEWAY_SECONDS = 60
_ROLE_RANK: dict[str, int] = {TeamRole.MEMBER: 0, TeamRole.ADMIN: 1}


class SsoError(Exception):
    """A sign-in refused: the message is shown on the login page."""


def sso_enabled() -> bool:
    return bool(settings.GATEWAY_OIDC_ISSUER)


def _discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


@lru_cache(maxsize=1)
def _client_for(issuer: str, client_id: str, client_secret: str, scopes: str) -> DjangoOAuth2App:
    oauth = OAuth()
    client = oauth.register(
        name="gateway",
        client_id=client_id,
        client_secret=client_secret,
        server_metadata_url=_discovery_url(issuer),
        client_kwargs={"scope": scopes, "code_challenge_method": "S256", "timeout": 10},
    )
    assert isinstance(client, DjangoOAuth2App)
    return client


def oidc_client() -> DjangoOAuth2App:
    """The OIDC client for the configured IdP (its discovery document is fetched once)."""
    if not sso_enabled():
        raise SsoError("Single sign-on is not configured.")
    client = _client_for(
        settings.GATEWAY_OIDC_ISSUER,
        settings.GATEWAY_OIDC_CLIENT_ID,
        settings.GATEWAY_OIDC_CLIENT_SECRET,
        settings.GATEWAY_OIDC_SCOPES,
    )
    metadata = client.load_server_metadata()
    # OpenID Connect Discovery 1.0 §4.3: the document must name the issuer we trust.
    if metadata.get("issuer") != settings.GATEWAY_OIDC_ISSUER:
        raise SsoError(
            f"The IdP's discovery document names issuer {metadata.get('issuer')!r}, not "
            f"GATEWAY_OIDC_ISSUER={settings.GATEWAY_OIDC_ISSUER!r}."
        )
    return client


def sso_verify_id_token(
    *, client: DjangoOAuth2App, token: Mapping[str, Any], nonce: str
) -> dict[str, Any]:
    """The ID token's claims once its signature, iss, aud, exp, iat and nonce check out.

    Fails closed: any doubt raises SsoError. Authlib's own checks accept an audience
    other than ours when `azp` names us, so the audience is pinned here too.
    """
    if not nonce:
        raise SsoError("The sign-in lost its nonce; start again.")
    if not token.get("id_token"):
        raise SsoError("The IdP returned no ID token.")
    client_id = str(client.client_id)
    try:
        claims = client.parse_id_token(
            dict(token),
            nonce=nonce,
            claims_options={
                "iss": {"essential": True, "value": settings.GATEWAY_OIDC_ISSUER},
                "aud": {"essential": True, "value": client_id},
                "exp": {"essential": True},
            },
            leeway=ID_TOKEN_LEEWAY_SECONDS,
        )
    except Exception as exc:  # any library error about the token is a refusal
        log.warning("sso: ID token refused: %r", exc)
        raise SsoError("The IdP's ID token did not verify.") from exc
    if claims is None:
        raise SsoError("The IdP returned no ID token.")
    aud = claims.get("aud")
    if client_id not in (aud if isinstance(aud, list) else [aud]):
        raise SsoError("The IdP's ID token was issued to another client.")
    return dict(claims)


# --- Users, just in time -------------------------------------------------------------


@dataclass(frozen=True)
class SsoProfile:
    issuer: str
    subject: str
    email: str
    email_verified: bool
    username_hint: str
    first_name: str
    last_name: str
    groups: frozenset[str]


def _truthy(value: Any) -> bool:
    # Some IdPs send booleans as strings.
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def sso_profile(
    *, claims: Mapping[str, Any], userinfo: Mapping[str, Any] | None = None
) -> SsoProfile:
    """The person the claims describe; userinfo fills what the ID token leaves out."""
    merged: dict[str, Any] = {**(userinfo or {}), **claims}
    raw_groups = merged.get(settings.GATEWAY_OIDC_GROUPS_CLAIM) or []
    if isinstance(raw_groups, str):
        raw_groups = [raw_groups]
    groups = frozenset(str(g) for g in raw_groups if str(g).strip())
    return SsoProfile(
        issuer=str(claims["iss"]),
        subject=str(claims["sub"]),
        email=str(merged.get("email") or "").strip(),
        email_verified=_truthy(merged.get("email_verified")),
        username_hint=str(
            merged.get("preferred_username") or merged.get("email") or claims["sub"]
        ).strip(),
        first_name=str(merged.get("given_name") or "")[:150],
        last_name=str(merged.get("family_name") or "")[:150],
        groups=groups,
    )


def _free_username(hint: str) -> str:
    base = (hint or "user")[:140]
    name, n = base, 1
    while User.objects.filter(username=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def sso_login(*, profile: SsoProfile) -> User:
    """The user for this sign-in: found by `sub`, else by verified e-mail, else created.

    Then the IdP groups set the user's team and platform roles. Refuses deactivated users.
    """
    with transaction.atomic():
        identity = (
            UserIdentity.objects.select_for_update()
            .select_related("user")
            .filter(oidc_issuer=profile.issuer, oidc_subject=profile.subject)
            .first()
        )
        if identity is not None:
            user = identity.user
        else:
            user = _match_or_create(profile)
            identity, _ = UserIdentity.objects.get_or_create(user=user)
            if identity.oidc_subject and identity.oidc_subject != profile.subject:
                # The e-mail belongs to someone the IdP knows under another subject.
                raise SsoError("This e-mail address is linked to another SSO account.")
            identity.oidc_issuer, identity.oidc_subject = profile.issuer, profile.subject
            identity.save(update_fields=["oidc_issuer", "oidc_subject", "updated_at"])
        if not user.is_active:
            raise SsoError("This account is deactivated; ask your administrator.")
        sso_apply_groups(user=user, groups=profile.groups | scim_groups_of(user), actor="sso")
        User.objects.filter(id=user.id).update(last_login=timezone.now())
    return user


def _match_or_create(profile: SsoProfile) -> User:
    if profile.email and profile.email_verified:
        matches = list(User.objects.filter(email__iexact=profile.email)[:2])
        if len(matches) == 1:
            return matches[0]
    user = User(
        username=_free_username(profile.username_hint),
        email=profile.email if profile.email_verified else "",
        first_name=profile.first_name,
        last_name=profile.last_name,
    )
    # No password: this person signs in through the IdP only.
    user.set_unusable_password()
    user.save()
    audit(actor="sso", action="create", obj=user, before=None, after=_user_snapshot(user))
    return user


def _user_snapshot(user: User) -> dict[str, Any]:
    # Never the password hash.
    return {
        "username": user.username,
        "email": user.email,
        "is_active": user.is_active,
        "is_superuser": user.is_superuser,
    }


# --- Groups → roles ----------------------------------------------------------------------


def scim_groups_of(user: User) -> frozenset[str]:
    return frozenset(user.scim_groups.values_list("display_name", flat=True))


def desired_team_roles(groups: Iterable[str]) -> dict[int, str]:
    """Team id → the highest role any of these groups grants there."""
    held = set(groups)
    roles: dict[int, str] = {}
    for team_id, mapping in Team.objects.exclude(sso_groups={}).values_list("id", "sso_groups"):
        for group, role in (mapping or {}).items():
            if group in held and _ROLE_RANK[role] >= _ROLE_RANK.get(roles.get(team_id, ""), -1):
                roles[team_id] = role
    return roles


def sso_apply_groups(*, user: User, groups: Iterable[str], actor: str) -> None:
    """Make the user's roles what the IdP groups say, auditing each grant and removal.

    Memberships a person added by hand are left alone unless a group now sets them;
    those the groups set are removed when no group grants them any more. Platform
    admin and finance follow GATEWAY_OIDC_ADMIN_GROUPS / _FINANCE_GROUPS the same way.
    """
    groups = frozenset(groups)
    desired = desired_team_roles(groups)
    with transaction.atomic():
        current = {m.team_id: m for m in Membership.objects.select_for_update().filter(user=user)}
        for team_id, role in desired.items():
            membership = current.get(team_id)
            if membership is None:
                membership = Membership.objects.create(
                    user=user, team_id=team_id, role=role, managed_by="sso"
                )
                audit(actor=actor, action="create", obj=membership, before=None, team_id=team_id)
            elif membership.role != role or membership.managed_by != "sso":
                before = _membership_snapshot(membership)
                membership.role, membership.managed_by = role, "sso"
                membership.save(update_fields=["role", "managed_by"])
                audit(actor=actor, action="update", obj=membership, before=before, team_id=team_id)
        for team_id, membership in current.items():
            if team_id not in desired and membership.managed_by == "sso":
                before, pk = _membership_snapshot(membership), membership.pk
                membership.delete()
                membership.pk = pk
                audit(actor=actor, action="delete", obj=membership, before=before, team_id=team_id)
        _apply_platform_roles(user=user, groups=groups, actor=actor)


def _membership_snapshot(m: Membership) -> dict[str, Any]:
    return {"user": m.user_id, "team": m.team_id, "role": m.role, "managed_by": m.managed_by}


def _apply_platform_roles(*, user: User, groups: frozenset[str], actor: str) -> None:
    identity, _ = UserIdentity.objects.select_for_update().get_or_create(user=user)
    before = {**_user_snapshot(user), "finance": _is_finance(user)}
    changed: list[str] = []
    admin_groups = set(settings.GATEWAY_OIDC_ADMIN_GROUPS)
    if admin_groups:
        wants_admin = bool(groups & admin_groups)
        if wants_admin and not user.is_superuser:
            user.is_superuser = user.is_staff = True
            identity.admin_by_sso = True
            changed.append("is_superuser")
        elif not wants_admin and user.is_superuser and identity.admin_by_sso:
            user.is_superuser = user.is_staff = False
            identity.admin_by_sso = False
            changed.append("is_superuser")
    finance_groups = set(settings.GATEWAY_OIDC_FINANCE_GROUPS)
    if finance_groups:
        wants_finance = bool(groups & finance_groups)
        is_finance = _is_finance(user)
        if wants_finance and not is_finance:
            StaffRole.objects.update_or_create(user=user, defaults={"role": PlatformRole.FINANCE})
            identity.finance_by_sso = True
            changed.append("finance")
        elif not wants_finance and is_finance and identity.finance_by_sso:
            StaffRole.objects.filter(user=user).delete()
            identity.finance_by_sso = False
            changed.append("finance")
    if not changed:
        return
    user.save(update_fields=["is_superuser", "is_staff"])
    identity.save(update_fields=["admin_by_sso", "finance_by_sso", "updated_at"])
    after = {**_user_snapshot(user), "finance": _is_finance(user)}
    audit(actor=actor, action="update", obj=user, before=before, after=after)


def _is_finance(user: User) -> bool:
    return StaffRole.objects.filter(user=user, role=PlatformRole.FINANCE).exists()
