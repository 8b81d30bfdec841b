"""Who the signed-in user is to the dashboard, and the getters that check it.

Every view starts from a `Viewer`, loaded once per request (two small queries), and
reaches objects only through the getters below. The rule for refusals: an object
the viewer may not even see is a 404 (its existence is not revealed to other
teams); an object they may see but not change is a 403.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import update_wrapper
from typing import Concatenate, ParamSpec

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse

from accounts.models import Team, TeamRole, VirtualKey
from accounts.selectors import is_finance, key_get, owned_key_ids, team_get, team_roles
from billing import invoices
from billing.models import Invoice, InvoiceStatus
from core.errors import GatewayError

P = ParamSpec("P")


@dataclass(frozen=True)
class Viewer:
    user_id: int
    username: str
    is_platform_admin: bool
    is_finance: bool
    # team id → "admin" | "member"
    team_roles: dict[int, str] = field(default_factory=dict)

    # --- platform-wide ---------------------------------------------------------------

    @property
    def sees_all_teams(self) -> bool:
        return self.is_platform_admin or self.is_finance

    @property
    def role_label(self) -> str:
        if self.is_platform_admin:
            return "Platform admin"
        if self.is_finance:
            return "Finance"
        if TeamRole.ADMIN in self.team_roles.values():
            return "Team admin"
        return "Member" if self.team_roles else "No team"

    @property
    def admin_team_ids(self) -> list[int]:
        return sorted(t for t, role in self.team_roles.items() if role == TeamRole.ADMIN)

    @property
    def member_team_ids(self) -> list[int]:
        return sorted(t for t, role in self.team_roles.items() if role == TeamRole.MEMBER)

    @property
    def can_manage_models(self) -> bool:
        return self.is_platform_admin

    @property
    def can_view_models(self) -> bool:
        # Finance reads prices; credentials are never shown to anyone.
        return self.is_platform_admin or self.is_finance

    @property
    def can_manage_users(self) -> bool:
        return self.is_platform_admin

    @property
    def can_create_teams(self) -> bool:
        return self.is_platform_admin

    @property
    def can_view_audit(self) -> bool:
        return self.sees_all_teams or bool(self.admin_team_ids)

    @property
    def can_issue_keys(self) -> bool:
        return self.is_platform_admin or bool(self.team_roles)

    # --- teams ---------------------------------------------------------------------------

    def can_view_team(self, team_id: int) -> bool:
        return self.sees_all_teams or team_id in self.team_roles

    def can_view_team_details(self, team_id: int) -> bool:
        """Settings and the member list: not for plain members."""
        return self.sees_all_teams or self.team_roles.get(team_id) == TeamRole.ADMIN

    def can_manage_members(self, team_id: int) -> bool:
        return self.is_platform_admin or self.team_roles.get(team_id) == TeamRole.ADMIN

    def can_configure_team(self, team_id: int) -> bool:
        # Budget, period and markup decide what a team pays: platform admins only.
        return self.is_platform_admin

    def can_issue_keys_in(self, team_id: int) -> bool:
        return self.is_platform_admin or team_id in self.team_roles

    def can_set_key_limits_in(self, team_id: int) -> bool:
        return self.is_platform_admin or self.team_roles.get(team_id) == TeamRole.ADMIN

    # --- keys ------------------------------------------------------------------------------

    def can_view_key(self, key: VirtualKey) -> bool:
        if self.sees_all_teams:
            return True
        role = self.team_roles.get(key.team_id)
        return role == TeamRole.ADMIN or (role == TeamRole.MEMBER and key.owner_id == self.user_id)

    def can_manage_key(self, key: VirtualKey) -> bool:
        """Revoke and rotate: admins, and members for their own keys."""
        if self.is_platform_admin:
            return True
        role = self.team_roles.get(key.team_id)
        return role == TeamRole.ADMIN or (role == TeamRole.MEMBER and key.owner_id == self.user_id)

    def can_set_key_limits(self, key: VirtualKey) -> bool:
        # A member may change their own key's limits where the team has a key policy:
        # the service holds every change within its caps (gateway.services).
        if self.can_set_key_limits_in(key.team_id):
            return True
        role = self.team_roles.get(key.team_id)
        return (
            role == TeamRole.MEMBER
            and key.owner_id == self.user_id
            and key.team.has_member_key_policy
        )

    def bound_by_key_policy(self, team_id: int) -> bool:
        """A plain member: their keys must stay within the team's member key policy."""
        return not self.can_set_key_limits_in(team_id)

    # --- invoices --------------------------------------------------------------------------

    @property
    def can_manage_invoices(self) -> bool:
        """Draft, finalize and void: the one thing finance changes, and platform admins."""
        return self.sees_all_teams

    @property
    def can_view_invoices(self) -> bool:
        return self.sees_all_teams or bool(self.admin_team_ids)

    def can_view_invoices_of(self, team_id: int) -> bool:
        """Team admins read their own team's issued invoices (finalized or void), no drafts."""
        return self.sees_all_teams or self.team_roles.get(team_id) == TeamRole.ADMIN

    def can_view_invoice(self, team_id: int, status: str) -> bool:
        if not self.can_view_invoices_of(team_id):
            return False
        return self.can_manage_invoices or status != InvoiceStatus.DRAFT

    @property
    def can_view_reconciliation(self) -> bool:
        """The providers' bills against the ledger: the company's costs, finance's only."""
        return self.sees_all_teams

    # --- webhooks and alert recipients ----------------------------------------------------

    def can_manage_notifications(self, team_id: int) -> bool:
        """Where a team's alerts and events go: its admins, and platform admins."""
        return self.is_platform_admin or self.team_roles.get(team_id) == TeamRole.ADMIN

    # --- row filters (None: everything) --------------------------------------------

    def visible_team_ids(self) -> list[int] | None:
        return None if self.sees_all_teams else sorted(self.team_roles)

    def keys_q(self) -> Q | None:
        """The keys this viewer may see, as a filter on VirtualKey."""
        if self.sees_all_teams:
            return None
        return Q(team_id__in=self.admin_team_ids) | Q(
            team_id__in=self.member_team_ids, owner_id=self.user_id
        )

    def ledger_q(self) -> Q | None:
        """The ledger rows this viewer may see, as a filter on LedgerEntry."""
        if self.sees_all_teams:
            return None
        q = Q(team_id__in=self.admin_team_ids)
        if self.member_team_ids:
            own = owned_key_ids(team_ids=self.member_team_ids, owner_id=self.user_id)
            q |= Q(key_id__in=own)
        return q

    def audit_q(self) -> Q | None:
        if self.sees_all_teams:
            return None
        # Team admins read their teams' history, except the drafting of invoices: drafts
        # are finance's (can_view_invoice), and an invoice's create and update entries
        # are only ever about its draft. Finalize and void are about what was issued.
        drafts = Q(object_type="invoice", action__in=("create", "update"))
        return Q(team_id__in=self.admin_team_ids) & ~drafts


def load_viewer(user: AbstractBaseUser | AnonymousUser) -> Viewer:
    assert isinstance(user, User)
    roles = team_roles(user.id)
    finance = is_finance(user.id)
    return Viewer(
        user_id=user.id,
        username=user.get_username(),
        is_platform_admin=user.is_superuser,
        is_finance=finance,
        team_roles=roles,
    )


class DashboardRequest(HttpRequest):
    """A request that went through `dashboard_view`: signed in, with its viewer."""

    user: User
    viewer: Viewer


def dashboard_view(
    view: Callable[Concatenate[DashboardRequest, P], HttpResponse],
) -> Callable[Concatenate[HttpRequest, P], HttpResponse]:
    """Sign-in required; attaches `request.viewer` for the getters and templates."""

    def wrapper(request: HttpRequest, /, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        if not request.user.is_authenticated or not request.user.is_active:
            return redirect_to_login(request.get_full_path())
        request.viewer = load_viewer(request.user)  # type: ignore[attr-defined]
        return view(request, *args, **kwargs)  # type: ignore[arg-type]

    # Not @wraps: its return type would claim the view's DashboardRequest signature.
    update_wrapper(wrapper, view)
    return wrapper


def require(allowed: bool) -> None:
    if not allowed:
        raise PermissionDenied


# --- getters ---------------------------------------------------------------------------------


def get_team_for_viewer(viewer: Viewer, team_id: int) -> Team:
    team = team_get(team_id)
    if team is None or not viewer.can_view_team(team.id):
        raise Http404("No such team.")
    return team


def get_team_for_details(viewer: Viewer, team_id: int) -> Team:
    team = get_team_for_viewer(viewer, team_id)
    require(viewer.can_view_team_details(team.id))
    return team


def get_team_for_members(viewer: Viewer, team_id: int) -> Team:
    team = get_team_for_viewer(viewer, team_id)
    require(viewer.can_manage_members(team.id))
    return team


def get_team_for_config(viewer: Viewer, team_id: int) -> Team:
    team = get_team_for_viewer(viewer, team_id)
    require(viewer.can_configure_team(team.id))
    return team


def get_team_for_notifications(viewer: Viewer, team_id: int) -> Team:
    team = get_team_for_viewer(viewer, team_id)
    require(viewer.can_manage_notifications(team.id))
    return team


def get_invoice_for_viewer(viewer: Viewer, invoice_id: int) -> Invoice:
    """The invoice with its lines. Another team's, or a draft for a team admin: 404."""
    try:
        invoice = invoices.invoice_get(invoice_id=invoice_id)
    except GatewayError:
        raise Http404("No such invoice.") from None
    if not viewer.can_view_team(invoice.team_id):
        raise Http404("No such invoice.")
    require(viewer.can_view_invoices_of(invoice.team_id))
    if not viewer.can_view_invoice(invoice.team_id, invoice.status):
        raise Http404("No such invoice.")
    return invoice


def get_invoice_for_manager(viewer: Viewer, invoice_id: int) -> Invoice:
    invoice = get_invoice_for_viewer(viewer, invoice_id)
    require(viewer.can_manage_invoices)
    return invoice


def get_key_for_viewer(viewer: Viewer, key_id: int) -> VirtualKey:
    key = key_get(key_id)
    if key is None or not viewer.can_view_key(key):
        raise Http404("No such key.")
    return key


def get_key_for_manager(viewer: Viewer, key_id: int) -> VirtualKey:
    key = get_key_for_viewer(viewer, key_id)
    require(viewer.can_manage_key(key))
    return key


def get_key_for_limits(viewer: Viewer, key_id: int) -> VirtualKey:
    key = get_key_for_viewer(viewer, key_id)
    require(viewer.can_set_key_limits(key))
    return key
