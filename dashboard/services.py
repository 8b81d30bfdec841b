"""Writes to the dashboard's own tables (memberships, platform roles, users), and the
model test call.

Writes to teams, keys and models go through `gateway.services`, never here. Team
membership changes are recorded in the same audit log as everything else, through
`gateway.services.audit`, so a team admin sees who joined and left their team. So
are new users and every platform role change (who, before, after); a user created
outside the dashboard (`manage.py createsuperuser`, a shell) is recorded by
`audit_user_created_elsewhere`, connected in dashboard/apps.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.db import IntegrityError, transaction

from accounts.models import Membership, PlatformRole, StaffRole, Team, TeamRole
from core.audit import audit, snapshot
from core.errors import GatewayError
from gateway.models import ModelDeployment

if TYPE_CHECKING:
    from gateway.routing import Deployment


class DashboardError(Exception):
    """A refusal to show the person who asked, next to the form field it concerns."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


# --- memberships --------------------------------------------------------------------------------


def membership_add(*, team: Team, user: User, role: str, actor: str) -> Membership:
    if role not in TeamRole.values:
        raise DashboardError(f"Unknown role {role!r}.", "role")
    try:
        with transaction.atomic():
            # The unique constraint, not the check, decides between two concurrent adds.
            membership = Membership.objects.create(team=team, user=user, role=role)
            audit(actor=actor, action="create", obj=membership, before=None, team_id=team.id)
    except IntegrityError:
        raise DashboardError(f"{user.username} is already in {team.name}.", "username") from None
    return membership


def membership_set_role(*, membership: Membership, role: str, actor: str) -> Membership:
    if role not in TeamRole.values:
        raise DashboardError(f"Unknown role {role!r}.", "role")
    with transaction.atomic():
        # Locked so two admins demoting each other cannot leave the team with none.
        locked = Membership.objects.select_for_update().get(id=membership.id)
        if locked.role == role:
            return locked
        if locked.role == TeamRole.ADMIN and not _other_admins(locked):
            raise DashboardError("A team keeps at least one admin; promote someone else first.")
        before = snapshot(locked)
        locked.role = role
        locked.save(update_fields=["role"])
        audit(actor=actor, action="update", obj=locked, before=before, team_id=locked.team_id)
    return locked


def membership_remove(*, membership: Membership, actor: str) -> None:
    with transaction.atomic():
        locked = Membership.objects.select_for_update().get(id=membership.id)
        if locked.role == TeamRole.ADMIN and not _other_admins(locked):
            raise DashboardError("A team keeps at least one admin; promote someone else first.")
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


# --- users and platform roles ---------------------------------------------------------------------

PLATFORM_ROLES = {
    "": "No platform role",
    "finance": "Finance (invoices; read-only elsewhere)",
    "admin": "Platform admin",
}


def user_create(
    *, username: str, email: str, password: str, platform_role: str, actor: str
) -> User:
    if User.objects.filter(username__iexact=username).exists():
        raise DashboardError(f"The username {username!r} is taken.", "username")
    user = User(username=username, email=email)
    try:
        validate_password(password, user)
    except Exception as exc:
        messages = getattr(exc, "messages", [str(exc)])
        raise DashboardError(" ".join(messages), "password") from None
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
        raise DashboardError(f"Unknown platform role {platform_role!r}.", "platform_role")
    if user.pk == actor_user.pk and platform_role != "admin":
        # Nobody locks themselves (possibly the last platform admin) out by accident.
        raise DashboardError("You cannot remove your own platform admin role.", "platform_role")
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


# --- the model test button -----------------------------------------------------------------------

TEST_PROMPT = "Reply with one short sentence to confirm you are working."


@dataclass(frozen=True)
class TestResult:
    ok: bool
    latency_ms: int
    answer: str
    detail: str = ""


def deployment_test(*, deployment: ModelDeployment, timeout_seconds: float = 30.0) -> TestResult:
    """One real call to this deployment's provider, outside any team's budget or ledger.

    It goes straight through `gateway.upstream` with the deployment's own settings
    and credential, so it tests exactly what the router would call.
    """
    from gateway import routing, upstream  # imports litellm: only when someone tests

    try:
        target = routing.snapshot(deployment)
    except ValueError as exc:
        return TestResult(False, 0, "", str(exc))
    embedding = target.mode == "embedding"
    started = time.monotonic()
    try:
        # A loop of its own (this runs in a view's worker thread): its connection pool is
        # closed when the call ends, not left for the garbage collector to warn about.
        data = asyncio.run(_call_provider(target, embedding, limit_seconds=timeout_seconds))
    except upstream.UpstreamError as exc:
        return TestResult(False, _ms(started), "", f"{exc.status}: {exc.message}")
    except (TimeoutError, GatewayError) as exc:
        return TestResult(False, _ms(started), "", str(exc) or "The provider did not answer.")
    latency = _ms(started)
    if embedding:
        vectors = data.get("data") or [{}]
        dims = len(vectors[0].get("embedding") or [])
        return TestResult(True, latency, f"An embedding with {dims} dimensions.")
    try:
        answer = str(data["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        answer = ""
    return TestResult(True, latency, answer[:2000] or "(an empty answer)")


async def _call_provider(
    target: Deployment, embedding: bool, *, limit_seconds: float
) -> dict[str, Any]:
    import litellm

    from gateway import upstream

    if embedding:
        body: dict[str, Any] = {"input": ["gateway test"]}
        path, call = "embeddings", litellm.aembedding
    else:
        body = {"messages": [{"role": "user", "content": TEST_PROMPT}], "max_tokens": 64}
        path, call = "chat/completions", litellm.acompletion
    try:
        async with asyncio.timeout(limit_seconds):
            if upstream.is_passthrough(target):
                payload = upstream.passthrough_payload(target, body)
                target_url = upstream.openai_target(target, path)
                answer = await upstream.passthrough_json(target_url, target, payload)
            else:
                answer = await upstream.litellm_json(call, target, body)
    finally:
        await upstream.close_sessions()
    return answer.data


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
