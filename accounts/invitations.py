"""Invitations: a team admin invites someone by e-mail, without a platform admin or an IdP.

The e-mail carries a single-use link, valid GATEWAY_INVITATION_DAYS (7), that lets
the newcomer choose a username and a password and join the team with the invited
role. Only a SHA-256 of the link's token is stored (it carries 256 random bits, so a
fast hash is enough), and accepting claims the invitation by compare-and-set, so two
clicks on one link make one account.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from accounts.models import Invitation, Membership, Team, TeamRole
from core.audit import audit


class InvitationError(Exception):
    """Shown to the person: the link is used, expired or unknown, or a field is wrong."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_create(
    *,
    team: Team,
    email: str,
    role: str,
    invited_by: User,
    link_for: Callable[[str], str],
) -> Invitation:
    """Record the invitation and e-mail its link (`link_for(token)` is the absolute URL)."""
    if role not in TeamRole.values:
        raise InvitationError(f"{role!r} is not a team role.", "role")
    email = email.strip()
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        invitation = Invitation.objects.create(
            team=team,
            email=email,
            role=role,
            token_hash=_hash(token),
            invited_by=invited_by,
            expires_at=timezone.now() + timedelta(days=settings.GATEWAY_INVITATION_DAYS),
        )
        audit(
            actor=invited_by.username,
            action="create",
            obj=invitation,
            before=None,
            team_id=team.id,
            after={"email": email, "role": role, "expires_at": invitation.expires_at.isoformat()},
        )
        link = link_for(token)
        # Sent once the invitation is committed: a link must never point at nothing.
        transaction.on_commit(
            lambda: send_mail(
                subject=f"You are invited to {team.name} on the LLM Gateway",
                message=(
                    f"{invited_by.get_full_name() or invited_by.username} invited you to join "
                    f"{team.name} as {TeamRole(role).label.lower()}.\n\n"
                    f"Choose a username and a password here (the link works once, for "
                    f"{settings.GATEWAY_INVITATION_DAYS} days):\n{link}\n"
                ),
                from_email=None,
                recipient_list=[email],
            )
        )
    return invitation


def invitation_for_token(*, token: str) -> Invitation:
    """The invitation a link names, if it can still be accepted."""
    invitation = Invitation.objects.select_related("team").filter(token_hash=_hash(token)).first()
    if invitation is None:
        raise InvitationError("This invitation link is not valid.")
    if invitation.accepted_at is not None:
        raise InvitationError("This invitation has already been used; sign in instead.")
    if invitation.expires_at <= timezone.now():
        raise InvitationError("This invitation has expired; ask your team admin for a new one.")
    return invitation


def invitation_accept(*, token: str, username: str, password: str) -> User:
    """Create the newcomer's account and membership; the link is spent."""
    invitation = invitation_for_token(token=token)
    username = username.strip()
    if not username:
        raise InvitationError("Choose a username.", "username")
    if User.objects.filter(username__iexact=username).exists():
        raise InvitationError("That username is taken; choose another.", "username")
    user = User(username=username, email=invitation.email)
    try:
        validate_password(password, user)
    except ValidationError as exc:
        raise InvitationError(" ".join(exc.messages), "password") from None
    with transaction.atomic():
        # Compare-and-set: of two acceptances of one link, one wins.
        claimed = Invitation.objects.filter(
            id=invitation.id, accepted_at__isnull=True, expires_at__gt=timezone.now()
        ).update(accepted_at=timezone.now())
        if not claimed:
            raise InvitationError("This invitation has already been used; sign in instead.")
        user.set_password(password)
        user.save()
        membership = Membership.objects.create(
            user=user, team_id=invitation.team_id, role=invitation.role
        )
        Invitation.objects.filter(id=invitation.id).update(accepted_by=user)
        actor = f"invitation:{user.username}"
        audit(
            actor=actor,
            action="create",
            obj=user,
            before=None,
            after={"username": user.username, "email": user.email},
        )
        audit(actor=actor, action="create", obj=membership, before=None, team_id=invitation.team_id)
    return user
