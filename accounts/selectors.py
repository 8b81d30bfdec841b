"""Reads of accounts: who belongs to which team, in which role."""

from __future__ import annotations

from accounts.models import Membership, TeamRole


def user_is_team_admin(*, user_id: int, team_id: int) -> bool:
    """A team admin's keys see all the team's files and batches (gateway.files)."""
    return Membership.objects.filter(user_id=user_id, team_id=team_id, role=TeamRole.ADMIN).exists()
