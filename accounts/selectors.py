"""Reads of accounts: who belongs to which team, in which role."""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import User
from django.db.models import Count, QuerySet

from accounts.models import Membership, PlatformRole, StaffRole, TeamRole


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
