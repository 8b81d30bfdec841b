"""Writes to accounts: teams, virtual keys (issue, change, rotate, revoke), team
memberships, users and platform roles.

Every change goes through a function here (never `.save()` at the edges), so that
the audit log and the team's member key policy apply whatever the edge. Each
function takes the `actor` to record: a dashboard user's name, "admin-api" for the
management API, "system" for commands.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypedDict, Unpack

from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import (
    KeySecret,
    Membership,
    PlatformRole,
    StaffRole,
    Team,
    TeamRole,
    VirtualKey,
)
from core.audit import audit, snapshot
from core.crypto import hash_key_secret, new_key_secret
from core.errors import GatewayError, invalid_request

# --- Teams ----------------------------------------------------------------------


BudgetPeriodName = Literal["daily", "weekly", "monthly", "total"]


class TeamFields(TypedDict, total=False):
    """What a team create or update may set besides its name (money in micro-USD)."""

    budget_micro_usd: int | None
    budget_period: BudgetPeriodName
    timezone: str
    alert_thresholds: list[int]
    markup_percent: Decimal
    rpm_limit: int | None
    tpm_limit: int | None
    cache_ttl_seconds: int | None
    metadata: dict[str, Any]
    member_key_max_budget_micro_usd: int | None
    member_key_max_rpm: int | None
    member_key_max_tpm: int | None
    member_key_allowed_models: list[str]
    member_key_max_lifetime_days: int | None
    # {"IdP group": "member" | "admin"} (accounts.models.validate_sso_groups)
    sso_groups: dict[str, str]


class KeyFields(TypedDict, total=False):
    """What a key create or update may set besides its name (money in micro-USD)."""

    owner: Any  # the dashboard user (django.contrib.auth User) or None
    owner_id: int | None
    allowed_models: list[str]
    expires_at: datetime | None
    metadata: dict[str, Any]
    max_budget_micro_usd: int | None
    budget_period: BudgetPeriodName
    rpm_limit: int | None
    tpm_limit: int | None
    cache_ttl_seconds: int | None


class TeamChanges(TeamFields, total=False):
    """A team update may also rename it."""

    name: str


class KeyChanges(KeyFields, total=False):
    """A key update may also rename it."""

    name: str


def team_create(*, name: str, actor: str = "system", **fields: Unpack[TeamFields]) -> Team:
    if Team.objects.filter(name=name).exists():
        raise GatewayError(
            f"A team named {name!r} already exists.", 409, code="conflict", param="name"
        )
    team = Team(name=name, **fields)
    team.full_clean()
    with transaction.atomic():
        team.save()
        audit(actor=actor, action="create", obj=team, before=None, team_id=team.id)
    return team


def team_update(*, team: Team, actor: str = "system", **fields: Unpack[TeamChanges]) -> Team:
    name = fields.get("name")
    if name and Team.objects.filter(name=name).exclude(id=team.id).exists():
        raise GatewayError(
            f"A team named {name!r} already exists.", 409, code="conflict", param="name"
        )
    before = snapshot(team)
    for attr, value in fields.items():
        setattr(team, attr, value)
    team.full_clean()
    with transaction.atomic():
        team.save(update_fields=[*fields.keys(), "updated_at"])
        audit(actor=actor, action="update", obj=team, before=before, team_id=team.id)
    return team


def team_delete(*, team: Team, actor: str = "system") -> None:
    if team.keys.filter(revoked_at__isnull=True).exists():
        raise GatewayError(
            "The team still has active keys; revoke them before deleting the team.",
            409,
            code="conflict",
        )
    with transaction.atomic():
        # Revoked keys keep their history in the ledger; remove their secrets first.
        KeySecret.objects.filter(key__team=team).delete()
        VirtualKey.objects.filter(team=team).delete()
        before, team_id = snapshot(team), team.id
        team.delete()
        team.pk = team_id
        audit(actor=actor, action="delete", obj=team, before=before, team_id=team_id)


# --- Virtual keys -------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedKey:
    key: VirtualKey
    secret: str


def _add_secret(key: VirtualKey) -> str:
    secret = new_key_secret()
    KeySecret.objects.create(key=key, secret_hash=hash_key_secret(secret), last4=secret[-4:])
    return secret


# Shortest first: a member key's budget may not reset more often than the team's.
_PERIOD_RANK = {"daily": 0, "weekly": 1, "monthly": 2, "total": 3}


def _policy_refusal(team: Team, param: str, message: str) -> GatewayError:
    return GatewayError(
        f"Team {team.name!r} caps the keys its members issue: {message}",
        403,
        "permission_error",
        "key_policy_exceeded",
        param,
    )


def _usd(micro: int) -> str:
    return f"${Decimal(micro) / 1_000_000:,.2f}"


def key_policy_check(*, team: Team, key: VirtualKey, created_at: datetime) -> None:
    """Refuse a member's key that goes past its team's member key policy.

    Called for keys a team member (not a team admin, not a platform admin) issues,
    changes or rotates; the whole key is checked, so editing any field of a key
    that is out of policy asks for it to be brought within the caps.
    """
    cap = team.member_key_max_budget_micro_usd
    if cap is not None:
        budget = key.max_budget_micro_usd
        if budget is None or budget > cap:
            raise _policy_refusal(
                team,
                "max_budget_micro_usd",
                f"a budget of at most {_usd(cap)} per {team.budget_period} period is required "
                f"(this key has {'none' if budget is None else _usd(budget)}).",
            )
        if _PERIOD_RANK[key.budget_period] < _PERIOD_RANK[team.budget_period]:
            raise _policy_refusal(
                team,
                "budget_period",
                f"the budget period must be {team.budget_period} or longer, not "
                f"{key.budget_period}.",
            )
    for field, cap_value, label in (
        ("rpm_limit", team.member_key_max_rpm, "requests per minute"),
        ("tpm_limit", team.member_key_max_tpm, "tokens per minute"),
    ):
        value = getattr(key, field)
        if cap_value is not None and (value is None or value > cap_value):
            raise _policy_refusal(
                team,
                field,
                f"a limit of at most {cap_value} {label} is required "
                f"(this key has {'none' if value is None else value}).",
            )
    allowed = list(team.member_key_allowed_models or [])
    if allowed:
        outside = sorted(set(key.allowed_models or []) - set(allowed))
        if not key.allowed_models or outside:
            raise _policy_refusal(
                team,
                "allowed_models",
                f"the key must be limited to models among {', '.join(allowed)}"
                + (f" ({', '.join(outside)} is not)." if outside else " (it allows every model)."),
            )
    days = team.member_key_max_lifetime_days
    if days is not None:
        latest = created_at + timedelta(days=days)
        if key.expires_at is None or key.expires_at > latest:
            raise _policy_refusal(
                team,
                "expires_at",
                f"the key must expire within {days} days of its creation, by "
                f"{latest:%Y-%m-%d %H:%M} UTC.",
            )


def key_create(
    *,
    team: Team,
    name: str,
    actor: str = "system",
    as_member: bool = False,
    **fields: Unpack[KeyFields],
) -> IssuedKey:
    """Issue a key. `as_member`: the actor is a plain team member, bound by the team's policy."""
    with transaction.atomic():
        key = VirtualKey(team=team, name=name, **fields)
        key.full_clean()
        if as_member:
            key_policy_check(team=team, key=key, created_at=timezone.now())
        key.save()
        secret = _add_secret(key)
        audit(actor=actor, action="create", obj=key, before=None, team_id=team.id)
    return IssuedKey(key=key, secret=secret)


def key_update(
    *,
    key: VirtualKey,
    actor: str = "system",
    as_member: bool = False,
    **fields: Unpack[KeyChanges],
) -> VirtualKey:
    before = snapshot(key)
    for attr, value in fields.items():
        setattr(key, attr, value)
    key.full_clean()
    if as_member:
        # The team row is read afresh: a policy tightened a moment ago applies.
        team = Team.objects.get(id=key.team_id)
        key_policy_check(team=team, key=key, created_at=key.created_at)
    with transaction.atomic():
        key.save(update_fields=[*fields.keys(), "updated_at"])
        audit(actor=actor, action="update", obj=key, before=before, team_id=key.team_id)
    return key


def key_revoke(*, key: VirtualKey, actor: str = "system") -> VirtualKey:
    before = snapshot(key)
    with transaction.atomic():
        # Compare-and-set so two concurrent revokes record one revocation.
        revoked = VirtualKey.objects.filter(id=key.id, revoked_at__isnull=True).update(
            revoked_at=timezone.now(), updated_at=timezone.now()
        )
        key.refresh_from_db()
        if revoked:
            audit(actor=actor, action="revoke", obj=key, before=before, team_id=key.team_id)
    return key


def key_rotate(
    *, key: VirtualKey, grace_seconds: int = 0, actor: str = "system", as_member: bool = False
) -> IssuedKey:
    if key.revoked_at is not None:
        raise invalid_request("A revoked key cannot be rotated; issue a new key instead.")
    if grace_seconds < 0:
        raise invalid_request(
            "grace_period_seconds must be 0 or more.", param="grace_period_seconds"
        )
    now = timezone.now()
    with transaction.atomic():
        locked = VirtualKey.objects.select_for_update().get(id=key.id)
        if as_member:
            # A fresh secret for a key out of policy would extend its use: bring it within first.
            team = Team.objects.get(id=locked.team_id)
            key_policy_check(team=team, key=locked, created_at=locked.created_at)
        old_expiry: datetime = now + timedelta(seconds=grace_seconds)
        # Secrets already expiring sooner keep their earlier expiry.
        KeySecret.objects.filter(key=locked, expires_at__isnull=True).update(expires_at=old_expiry)
        KeySecret.objects.filter(key=locked, expires_at__gt=old_expiry).update(
            expires_at=old_expiry
        )
        before = snapshot(locked)
        secret = _add_secret(locked)
        locked.save(update_fields=["updated_at"])
        audit(actor=actor, action="rotate", obj=locked, before=before, team_id=locked.team_id)
    return IssuedKey(key=locked, secret=secret)


def _conflict(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(message, 409, code="conflict", param=param)


# --- Memberships --------------------------------------------------------------------------------


def membership_add(*, team: Team, user: User, role: str, actor: str) -> Membership:
    if role not in TeamRole.values:
        raise invalid_request(f"Unknown role {role!r}.", param="role")
    try:
        with transaction.atomic():
            # The unique constraint, not the check, decides between two concurrent adds.
            membership = Membership.objects.create(team=team, user=user, role=role)
            audit(actor=actor, action="create", obj=membership, before=None, team_id=team.id)
    except IntegrityError:
        raise _conflict(f"{user.username} is already in {team.name}.", "username") from None
    return membership


def membership_set_role(*, membership: Membership, role: str, actor: str) -> Membership:
    if role not in TeamRole.values:
        raise invalid_request(f"Unknown role {role!r}.", param="role")
    with transaction.atomic():
        # Locked so two admins demoting each other cannot leave the team with none.
        locked = Membership.objects.select_for_update().get(id=membership.id)
        if locked.role == role:
            return locked
        if locked.role == TeamRole.ADMIN and not _other_admins(locked):
            raise _conflict("A team keeps at least one admin; promote someone else first.")
        before = snapshot(locked)
        locked.role = role
        locked.save(update_fields=["role"])
        audit(actor=actor, action="update", obj=locked, before=before, team_id=locked.team_id)
    return locked


def membership_remove(*, membership: Membership, actor: str) -> None:
    with transaction.atomic():
        locked = Membership.objects.select_for_update().get(id=membership.id)
        if locked.role == TeamRole.ADMIN and not _other_admins(locked):
            raise _conflict("A team keeps at least one admin; promote someone else first.")
        before, pk, team_id = snapshot(locked), locked.pk, locked.team_id
        locked.delete()
        locked.pk = pk
        audit(actor=actor, action="delete", obj=locked, before=before, team_id=team_id)


def _other_admins(membership: Membership) -> bool:
    return (
        Membership.objects.select_for_update()
        .filter(team_id=membership.team_id, role=TeamRole.ADMIN)
        .exclude(id=membership.id)
        .exists()
    )


# --- Users and platform roles ---------------------------------------------------------------------

PLATFORM_ROLES = {
    "": "No platform role",
    "finance": "Finance (invoices; read-only elsewhere)",
    "admin": "Platform admin",
}


def user_create(
    *, username: str, email: str, password: str, platform_role: str, actor: str
) -> User:
    if User.objects.filter(username__iexact=username).exists():
        raise _conflict(f"The username {username!r} is taken.", "username")
    user = User(username=username, email=email)
    try:
        validate_password(password, user)
    except Exception as exc:
        messages = getattr(exc, "messages", [str(exc)])
        raise invalid_request(" ".join(messages), param="password") from None
    token = _creating_user.set(True)
    try:
        with transaction.atomic():
            user.set_password(password)
            user.save()
            _apply_platform_role(user, platform_role)
            audit(actor=actor, action="create", obj=user, before=None, after=user_snapshot(user))
    finally:
        _creating_user.reset(token)
    return user


def user_set_platform_role(*, user: User, platform_role: str, actor_user: User) -> User:
    if platform_role not in PLATFORM_ROLES:
        raise invalid_request(f"Unknown platform role {platform_role!r}.", param="platform_role")
    if user.pk == actor_user.pk and platform_role != "admin":
        # Nobody locks themselves (possibly the last platform admin) out by accident.
        raise invalid_request(
            "You cannot remove your own platform admin role.", param="platform_role"
        )
    with transaction.atomic():
        # Locked so two admins changing one user's role record each change in order.
        user = User.objects.select_for_update().get(id=user.id)
        before = user_snapshot(user)
        _apply_platform_role(user, platform_role)
        after = user_snapshot(user)
        if after != before:
            audit(actor=actor_user.username, action="update", obj=user, before=before, after=after)
    return user


def user_snapshot(user: User) -> dict[str, Any]:
    """What the audit log keeps about a user: who they are and what they may do.

    Never the password hash (a generic snapshot of the row would include it).
    """
    finance = StaffRole.objects.filter(user_id=user.id, role=PlatformRole.FINANCE).exists()
    return {
        "username": user.username,
        "email": user.email,
        "is_active": user.is_active,
        "platform_role": platform_role_of(user, {user.id} if finance else set()),
    }


# Set while user_create runs, so the catch-all below does not record its user twice.
_creating_user: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "creating_user", default=False
)
ACTOR_OUTSIDE_DASHBOARD = "outside-dashboard"


def audit_user_created_elsewhere(*, user: User) -> None:
    """Record a user created without user_create (createsuperuser, a shell, a command)."""
    if _creating_user.get():
        return
    audit(
        actor=ACTOR_OUTSIDE_DASHBOARD,
        action="create",
        obj=user,
        before=None,
        after=user_snapshot(user),
    )


def _apply_platform_role(user: User, platform_role: str) -> None:
    superuser = platform_role == "admin"
    if user.is_superuser != superuser or user.is_staff != superuser:
        user.is_superuser = superuser
        user.is_staff = superuser
        user.save(update_fields=["is_superuser", "is_staff"])
    if platform_role == "finance":
        StaffRole.objects.update_or_create(user=user, defaults={"role": PlatformRole.FINANCE})
    else:
        StaffRole.objects.filter(user=user).delete()


def platform_role_of(user: User, finance_ids: set[int]) -> str:
    if user.is_superuser:
        return "admin"
    return "finance" if user.id in finance_ids else ""


# --- People ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedLogin:
    username: str
    password: str


def demo_admin_create(*, username: str = "admin", actor: str = "system") -> CreatedLogin | None:
    """The first platform admin of a fresh install, with a random password, or None.

    Only while there is no superuser at all, so a real install is never given one; the
    password is returned once to be printed and only its hash is kept.
    """
    import secrets

    from django.contrib.auth.models import User

    with transaction.atomic():
        if User.objects.filter(is_superuser=True).exists():
            return None
        name, n = username, 1
        while User.objects.filter(username=name).exists():
            n += 1
            name = f"{username}{n}"
        password = secrets.token_urlsafe(12)
        user = User.objects.create_superuser(name, email="", password=password)
        audit(
            actor=actor,
            action="create",
            obj=user,
            before=None,
            after={"username": user.username, "is_superuser": True},
        )
    return CreatedLogin(username=name, password=password)
