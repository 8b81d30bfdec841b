"""Who: teams, their virtual keys and key secrets, and the people in them.

Money limits are stored as integer micro-USD (1 USD = 1_000_000), never floats.

Platform roles live outside any team: a superuser is the platform admin, and a
`StaffRole(role="finance")` row makes a user finance: read-only over every team's
money, except invoices, which finance drafts, finalizes and voids. Team roles are
`Membership` rows: a team admin manages their team's members, keys, limits, webhooks
and alert recipients, and reads its issued invoices; a member sees their own keys and
usage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models


def validate_sso_groups(value: object) -> None:
    """`Team.sso_groups`: {"IdP group": "member" | "admin"}, group names non-empty."""
    if not isinstance(value, dict):
        raise ValidationError('sso_groups must map group names to "member" or "admin".')
    for group, role in value.items():
        if not isinstance(group, str) or not group.strip() or len(group) > 256:
            raise ValidationError(f"sso_groups: {group!r} is not a group name (1-256 characters).")
        if role not in ("member", "admin"):
            raise ValidationError(f'sso_groups: the role of {group!r} must be "member" or "admin".')


class BudgetPeriod(models.TextChoices):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    # A one-off prepaid credit that never resets.
    TOTAL = "total"


# --- Team rules: the one place each is written (the admin API and the dashboard forms
# both reach them, through Team.clean() or by calling them for an early message).


def timezone_check(value: str) -> str:
    """`value` if it is an IANA timezone name; raises ValidationError otherwise."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            f"'{value}' is not a timezone name; use one like Europe/Paris or UTC."
        ) from None
    return value


def alert_thresholds_check(values: Iterable[int]) -> list[int]:
    """Percentages of the budget, sorted and without repeats; raises ValidationError
    when one is outside 1..1000."""
    thresholds = list(values)
    if any(not 1 <= t <= 1000 for t in thresholds):
        raise ValidationError("Each threshold must be between 1 and 1000 percent.")
    return sorted(set(thresholds))


class Team(models.Model):
    name = models.CharField(max_length=200, unique=True)
    # Optional budget for each period, in micro-USD.
    budget_micro_usd = models.BigIntegerField(null=True, blank=True)
    budget_period = models.CharField(
        max_length=16, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTHLY
    )
    # Budget periods align to the calendar in this IANA timezone.
    timezone = models.CharField(max_length=64, default="UTC")
    # Percentages of the budget at which an alert is recorded, e.g. [50, 80, 100].
    alert_thresholds = models.JSONField(default=list, blank=True)
    # Applied to list cost to get the charged cost; negative for a discount.
    markup_percent = models.DecimalField(max_digits=7, decimal_places=3, default=Decimal("0"))
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveBigIntegerField(null=True, blank=True)
    # Response cache for all the team's keys: entries live this long; null is off.
    cache_ttl_seconds = models.PositiveIntegerField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    # The team's policy for keys its members (not its admins) issue or change; each
    # null or empty is no cap. Enforced by accounts.services, whatever the edge.
    # A member key's budget, in micro-USD per the team's budget period (or longer).
    member_key_max_budget_micro_usd = models.BigIntegerField(null=True, blank=True)
    member_key_max_rpm = models.PositiveIntegerField(null=True, blank=True)
    member_key_max_tpm = models.PositiveBigIntegerField(null=True, blank=True)
    # Public model names a member key may be limited to; empty: any model.
    member_key_allowed_models = models.JSONField(default=list, blank=True)
    # Days from a member key's creation to its expiry, at most.
    member_key_max_lifetime_days = models.PositiveIntegerField(null=True, blank=True)
    # IdP groups that make someone a member or an admin of this team, as
    # {"group name": "member" | "admin"}; applied at every SSO login and by SCIM.
    sso_groups = models.JSONField(default=dict, blank=True, validators=[validate_sso_groups])
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        # Created by the gateway app before accounts existed; the table kept its name.
        db_table = "gateway_team"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors: dict[str, ValidationError] = {}
        try:
            timezone_check(self.timezone)
        except ValidationError as exc:
            errors["timezone"] = exc
        try:
            self.alert_thresholds = alert_thresholds_check(self.alert_thresholds or [])
        except ValidationError as exc:
            errors["alert_thresholds"] = exc
        if errors:
            raise ValidationError(errors)

    @property
    def has_member_key_policy(self) -> bool:
        return any(
            (
                self.member_key_max_budget_micro_usd is not None,
                self.member_key_max_rpm is not None,
                self.member_key_max_tpm is not None,
                bool(self.member_key_allowed_models),
                self.member_key_max_lifetime_days is not None,
            )
        )


class VirtualKey(models.Model):
    """A key developers put in their SDK. Its secrets live in KeySecret, hashed."""

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="keys")
    # The dashboard user the key belongs to (team members see their own keys);
    # null for keys issued through the management API.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="virtual_keys",
    )
    name = models.CharField(max_length=200)
    # Public model names this key may call; empty means every configured model.
    allowed_models = models.JSONField(default=list, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    max_budget_micro_usd = models.BigIntegerField(null=True, blank=True)
    budget_period = models.CharField(
        max_length=16, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTHLY
    )
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveBigIntegerField(null=True, blank=True)
    # Overrides the team's response-cache TTL for this key; null inherits it.
    cache_ttl_seconds = models.PositiveIntegerField(null=True, blank=True)
    # Set while the key's owner is deactivated (SCIM): refused like a revoked key, and
    # cleared on reactivation, unlike a revocation.
    suspended_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        # Created by the gateway app before accounts existed; the table kept its name.
        db_table = "gateway_virtualkey"
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["team", "created_at"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.team_id})"


class KeySecret(models.Model):
    """One valid secret of a virtual key.

    Only a SHA-256 of the secret is kept (secrets carry 256 random bits, so a fast
    hash is enough). Rotation adds a new secret and gives the old one an expiry,
    which is the grace period during which both work.
    """

    key = models.ForeignKey(VirtualKey, on_delete=models.CASCADE, related_name="secrets")
    secret_hash = models.CharField(max_length=64, unique=True)
    last4 = models.CharField(max_length=4)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Created by the gateway app before accounts existed; the table kept its name.
        db_table = "gateway_keysecret"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"…{self.last4} of key {self.key_id}"


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
    # "sso" when the IdP's groups (SSO login or SCIM) set this membership: only those
    # are removed when the groups no longer grant it; "" was added by a person.
    managed_by = models.CharField(max_length=16, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Created by the dashboard app before accounts existed; the table kept its name.
        db_table = "dashboard_membership"
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

    class Meta:
        # Created by the dashboard app before accounts existed; the table kept its name.
        db_table = "dashboard_staffrole"

    def __str__(self) -> str:
        return f"{self.user_id}:{self.role}"


# --- Identity: single sign-on, SCIM provisioning, invitations ---------------------------


class UserIdentity(models.Model):
    """How a person is known to the identity provider: the OIDC subject and the SCIM ids.

    Platform roles granted by IdP groups are flagged, so that only those are taken
    back when the groups no longer grant them (a role given by hand stays).
    """

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="identity"
    )
    oidc_issuer = models.CharField(max_length=500, blank=True, default="")
    oidc_subject = models.CharField(max_length=255, blank=True, default="")
    # The SCIM resource id we hand out, and the IdP's own id for the user.
    scim_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    scim_external_id = models.CharField(max_length=255, blank=True, default="")
    scim_provisioned = models.BooleanField(default=False)
    admin_by_sso = models.BooleanField(default=False)
    finance_by_sso = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["oidc_issuer", "oidc_subject"],
                condition=~models.Q(oidc_subject=""),
                name="identity_oidc_subject_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}:{self.oidc_subject or self.scim_external_id}"


class ScimGroup(models.Model):
    """A group pushed by the IdP over SCIM; teams whose `sso_groups` name it follow it."""

    scim_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    display_name = models.CharField(max_length=256, unique=True)
    external_id = models.CharField(max_length=255, blank=True, default="")
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="scim_groups"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["display_name"]

    def __str__(self) -> str:
        return self.display_name


class Invitation(models.Model):
    """A team admin's invitation by e-mail: a single-use link that sets a password.

    Only a SHA-256 of the link's token is kept, as for key secrets.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=TeamRole.choices, default=TeamRole.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.email}@{self.team_id}"
