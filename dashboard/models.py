"""Who may do what in the dashboard.

Platform roles live outside any team: a superuser is the platform admin, and a
`StaffRole(role="finance")` row makes a user finance: read-only over every team's
money, except invoices, which finance drafts, finalizes and voids. Team roles are
`Membership` rows: a team admin manages their team's members, keys, limits, webhooks
and alert recipients, and reads its issued invoices; a member sees their own keys and
usage.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from gateway.models import Team


class TeamRole(models.TextChoices):
    ADMIN = "admin", "Team admin"
    MEMBER = "member", "Member"


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    # Deleting a team removes its memberships; the audit log keeps the history.
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=TeamRole.choices, default=TeamRole.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["team_id", "user_id"]
        constraints = [
            models.UniqueConstraint(fields=["user", "team"], name="membership_user_team_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}@{self.team_id}:{self.role}"


class PlatformRole(models.TextChoices):
    FINANCE = "finance", "Finance (read-only)"


class StaffRole(models.Model):
    """A platform-wide role short of superuser. One per user."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="staff_role"
    )
    role = models.CharField(max_length=16, choices=PlatformRole.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.user_id}:{self.role}"
