"""Reads of accounts: who belongs to which team, in which role."""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import User
from django.db.models import Count, QuerySet

from accounts.models import Membership, PlatformRole, StaffRole, Team, TeamRole, VirtualKey


def user_is_team_admin(*, user_id: int, team_id: int) -> bool:
    """A team admin's keys see all the team's files and batches (gateway.files)."""
    return Membership.objects.filter(user_id=user_id, team_id=team_id, role=TeamRole.ADMIN).exists()


def membership_get(*, team_id: int, membership_id: int) -> Membership | None:
    """A membership of `team_id` with its user (None when it is not that team's)."""
    return (
        Membership.objects.select_related("user").filter(id=membership_id, team_id=team_id).first()
    )


def user_get(user_id: int) -> User | None:
    return User.objects.filter(id=user_id).first()


def user_by_username(username: str) -> User | None:
    return User.objects.filter(username=username).first()


def users_with_team_counts() -> QuerySet[User]:
    """Every user, by username, each with `team_count`: the teams they belong to."""
    return User.objects.annotate(team_count=Count("memberships")).order_by("username")


def finance_user_ids(user_ids: Iterable[int]) -> set[int]:
    """Which of these users have the finance platform role."""
    return set(
        StaffRole.objects.filter(user_id__in=list(user_ids), role=PlatformRole.FINANCE).values_list(
            "user_id", flat=True
        )
    )


def team_roles(user_id: int) -> dict[int, str]:
    """The user's role in each of their teams: team id → "admin" | "member"."""
    return dict(Membership.objects.filter(user_id=user_id).values_list("team_id", "role"))


def is_finance(user_id: int) -> bool:
    return StaffRole.objects.filter(user_id=user_id, role=PlatformRole.FINANCE).exists()


def team_get(team_id: int) -> Team | None:
    return Team.objects.filter(id=team_id).first()


def key_get(key_id: int) -> VirtualKey | None:
    """A key with its team and owner loaded (pages show both)."""
    return VirtualKey.objects.select_related("team", "owner").filter(id=key_id).first()


def owned_key_ids(*, team_ids: Iterable[int], owner_id: int) -> QuerySet[VirtualKey, int]:
    """The ids of the keys a user owns in these teams, as a subquery."""
    keys = VirtualKey.objects.filter(team_id__in=team_ids, owner_id=owner_id)
    return keys.values_list("id", flat=True)


def teams(ids: Iterable[int] | None = None) -> QuerySet[Team]:
    """Every team, or those with these ids."""
    rows = Team.objects.all()
    return rows if ids is None else rows.filter(id__in=list(ids))


def keys(ids: Iterable[int]) -> QuerySet[VirtualKey]:
    """Keys by id, with their team and owner loaded."""
    return VirtualKey.objects.filter(id__in=list(ids)).select_related("team", "owner")
