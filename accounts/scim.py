"""SCIM 2.0 provisioning (RFC 7643/7644): Users and Groups, as Okta and Entra ID send them.

Hand-written rather than django-scim2 (which supports Django 5.2): that library wants
the SCIM ids as columns of the user model itself (we keep Django's stock User), saves
models directly from its adapters (our writes go through services and the audit log),
and transpiles filters to raw SQL over attribute maps. What we need is small: `eq`
filters on three attributes, paging, PUT and PATCH with the quirks of two IdPs.

Quirks handled, from their public docs:
- Entra ID: capitalised ops ("Replace", "Add", "Remove"); path-less ops whose value is
  an object of attributes; booleans as the strings "True"/"False"; member removal as
  `{"op": "Remove", "path": "members", "value": [{"value": id}]}`.
- Okta: `filter=userName eq "…"` before each create; deactivation by PATCH or PUT
  `active: false`; groups pushed with `members[value eq "…"]` removal paths.

This module speaks dicts in and out; the HTTP edge is gateway/api_scim.py.
Deactivation (active false, or DELETE) signs the person out everywhere, suspends the
keys they own and is audited; reactivation restores the keys it suspended.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.models import ScimGroup, UserIdentity, VirtualKey
from accounts.sso import scim_groups_of, sso_apply_groups
from core.audit import audit

ACTOR = "scim"
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
MAX_COUNT = 200


class ScimError(Exception):
    def __init__(self, status: int, detail: str, scim_type: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.scim_type = status, detail, scim_type

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "schemas": [ERROR_SCHEMA],
            "status": str(self.status),
            "detail": self.detail,
        }
        if self.scim_type:
            body["scimType"] = self.scim_type
        return body


def _bool(value: Any, attr: str) -> bool:
    # Entra sends "True"/"False" as strings.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ScimError(400, f"{attr} must be a boolean.", "invalidValue")


# --- Filters and paging ------------------------------------------------------------------

_FILTER = re.compile(r'^\s*([A-Za-z.:]+)\s+eq\s+"((?:[^"\\]|\\.)*)"\s*$', re.IGNORECASE)


def parse_filter(raw: str | None, attrs: Mapping[str, str]) -> Q | None:
    """`attr eq "value"` on one of `attrs` (SCIM name, lower-cased → ORM lookup)."""
    if not raw or not raw.strip():
        return None
    match = _FILTER.match(raw)
    if not match:
        raise ScimError(
            400, f'Only `attribute eq "value"` filters are supported: {raw!r}.', "invalidFilter"
        )
    attr, value = match.group(1).lower(), match.group(2).replace('\\"', '"')
    lookup = attrs.get(attr)
    if lookup is None:
        raise ScimError(400, f"Filtering on {match.group(1)!r} is not supported.", "invalidFilter")
    return Q(**{lookup: value})


def _int_param(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ScimError(400, f"{name} must be a whole number.", "invalidValue") from None


def page(
    qs: QuerySet[Any], params: Mapping[str, str], render: Any, base_url: str
) -> dict[str, Any]:
    start = max(1, _int_param(params.get("startIndex"), 1, "startIndex"))
    count = min(MAX_COUNT, max(0, _int_param(params.get("count"), 100, "count")))
    total = qs.count()
    rows = list(qs[start - 1 : start - 1 + count]) if count else []
    return {
        "schemas": [LIST_SCHEMA],
        "totalResults": total,
        "startIndex": start,
        "itemsPerPage": len(rows),
        "Resources": [render(row, base_url) for row in rows],
    }


# --- Users -------------------------------------------------------------------------------

USER_FILTERS = {
    "username": "username__iexact",
    "externalid": "identity__scim_external_id",
    "displayname": "username__iexact",
    "emails.value": "email__iexact",
    "emails": "email__iexact",
}


def scim_users() -> QuerySet[User]:
    return User.objects.filter(identity__scim_provisioned=True).select_related("identity")


def scim_groups() -> QuerySet[ScimGroup]:
    return ScimGroup.objects.all()


def scim_user_get(*, scim_id: str) -> User:
    try:
        uid = uuid.UUID(scim_id)
    except ValueError:
        raise ScimError(404, f"No user {scim_id}.") from None
    user = scim_users().filter(identity__scim_id=uid).first()
    if user is None:
        raise ScimError(404, f"No user {scim_id}.")
    return user


def user_to_scim(user: User, base_url: str) -> dict[str, Any]:
    identity = user.identity
    body: dict[str, Any] = {
        "schemas": [USER_SCHEMA],
        "id": str(identity.scim_id),
        "userName": user.username,
        "name": {"givenName": user.first_name, "familyName": user.last_name},
        "displayName": user.get_full_name() or user.username,
        "active": user.is_active,
        "emails": [{"value": user.email, "type": "work", "primary": True}] if user.email else [],
        "groups": [
            {"value": str(g.scim_id), "display": g.display_name} for g in user.scim_groups.all()
        ],
        "meta": {
            "resourceType": "User",
            "created": identity.created_at.isoformat(),
            "lastModified": identity.updated_at.isoformat(),
            "location": f"{base_url}/Users/{identity.scim_id}",
        },
    }
    if identity.scim_external_id:
        body["externalId"] = identity.scim_external_id
    return body


def _primary_email(emails: Any) -> str | None:
    if not isinstance(emails, list) or not emails:
        return None
    chosen = next(
        (e for e in emails if isinstance(e, dict) and e.get("primary") in (True, "true", "True")),
        None,
    )
    chosen = chosen or next((e for e in emails if isinstance(e, dict)), None)
    return str(chosen.get("value") or "") if chosen else None


def _user_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes of a full SCIM User body, as our field names."""
    fields: dict[str, Any] = {}
    if "userName" in data:
        fields["userName"] = data["userName"]
    if "externalId" in data:
        fields["externalId"] = data["externalId"]
    name = data.get("name")
    if isinstance(name, dict):
        if "givenName" in name:
            fields["name.givenName"] = name["givenName"]
        if "familyName" in name:
            fields["name.familyName"] = name["familyName"]
    email = _primary_email(data.get("emails"))
    if email is not None:
        fields["emails"] = email
    if "active" in data:
        fields["active"] = data["active"]
    return fields


def _apply_user_fields(
    user: User, identity: UserIdentity, fields: Mapping[str, Any]
) -> bool | None:
    """Set the attributes on the (unsaved) user; returns the wanted `active`, if given."""
    active: bool | None = None
    for attr, value in fields.items():
        key = attr.lower()
        if key == "username":
            if not isinstance(value, str) or not value.strip():
                raise ScimError(400, "userName is required.", "invalidValue")
            user.username = value.strip()[:150]
        elif key == "externalid":
            identity.scim_external_id = str(value or "")[:255]
        elif key == "name.givenname":
            user.first_name = str(value or "")[:150]
        elif key == "name.familyname":
            user.last_name = str(value or "")[:150]
        elif key in ("emails", "emails.value") or key.startswith("emails["):
            user.email = (
                _primary_email(value) if isinstance(value, list) else str(value or "")
            ) or ""
        elif key == "active":
            active = _bool(value, "active")
        # Other attributes (displayName, title, enterprise extension, …) are not kept.
    return active


def _username_taken(username: str, user_id: int | None) -> bool:
    same = User.objects.filter(username__iexact=username)
    return (same.exclude(id=user_id) if user_id is not None else same).exists()


def scim_user_create(*, data: Mapping[str, Any]) -> User:
    fields = _user_fields(data)
    if not str(fields.get("userName") or "").strip():
        raise ScimError(400, "userName is required.", "invalidValue")
    if _username_taken(str(fields["userName"]).strip(), None):
        raise ScimError(409, f"A user named {fields['userName']!r} exists.", "uniqueness")
    with transaction.atomic():
        user = User(username="")
        identity = UserIdentity(scim_provisioned=True)
        active = _apply_user_fields(user, identity, fields)
        user.set_unusable_password()
        user.is_active = True
        try:
            user.save()
        except IntegrityError:
            raise ScimError(409, "That userName exists.", "uniqueness") from None
        identity.user = user
        identity.save()
        audit(actor=ACTOR, action="create", obj=user, before=None, after=_snapshot(user))
        if active is False:
            user_deactivate(user=user, actor=ACTOR)
    return user


def _snapshot(user: User) -> dict[str, Any]:
    return {
        "username": user.username,
        "email": user.email,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "is_active": user.is_active,
    }


def _save_user(
    user: User, identity: UserIdentity, active: bool | None, before: dict[str, Any]
) -> User:
    if _username_taken(user.username, user.id):
        raise ScimError(409, f"A user named {user.username!r} exists.", "uniqueness")
    with transaction.atomic():
        user.save(update_fields=["username", "email", "first_name", "last_name"])
        identity.save(update_fields=["scim_external_id", "updated_at"])
        if _snapshot(user) != before:
            audit(actor=ACTOR, action="update", obj=user, before=before, after=_snapshot(user))
        if active is False and user.is_active:
            user_deactivate(user=user, actor=ACTOR)
        elif active is True and not user.is_active:
            user_reactivate(user=user, actor=ACTOR)
    return user


def scim_user_replace(*, user: User, data: Mapping[str, Any]) -> User:
    before, identity = _snapshot(user), user.identity
    fields = _user_fields(data)
    # PUT replaces: what the body leaves out is cleared (userName stays required).
    fields = {"name.givenName": "", "name.familyName": "", "externalId": "", **fields}
    if not str(fields.get("userName") or "").strip():
        raise ScimError(400, "userName is required.", "invalidValue")
    active = _apply_user_fields(user, identity, fields)
    return _save_user(user, identity, active, before)


def _operations(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    ops = body.get("Operations")
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise ScimError(400, "A PATCH body has an Operations list.", "invalidSyntax")
    for op in ops:
        name = str(op.get("op") or "").lower()  # Entra: "Replace", "Add", "Remove"
        if name not in ("add", "replace", "remove"):
            raise ScimError(400, f"Unknown PATCH op {op.get('op')!r}.", "invalidSyntax")
        op["op"] = name
    return ops


def scim_user_patch(*, user: User, body: Mapping[str, Any]) -> User:
    before, identity = _snapshot(user), user.identity
    active: bool | None = None
    for op in _operations(body):
        path, value = op.get("path"), op.get("value")
        if path:
            # Entra's enterprise attributes come prefixed with their schema URN.
            path = str(path).removeprefix(ENTERPRISE_SCHEMA + ":")
            if op["op"] == "remove":
                value = "" if path.lower() != "active" else False
            changes = {path: value}
        elif isinstance(value, dict):
            # Path-less: the value is an object of attributes (Entra, Okta).
            changes = {}
            for attr, item in value.items():
                if attr.lower() == "name" and isinstance(item, dict):
                    changes.update({f"name.{k}": v for k, v in item.items()})
                else:
                    changes[attr] = item
        else:
            raise ScimError(400, "An op without a path needs an object value.", "invalidValue")
        wanted = _apply_user_fields(user, identity, changes)
        if wanted is not None:
            active = wanted
    return _save_user(user, identity, active, before)


def scim_user_delete(*, user: User) -> None:
    """DELETE: the person is deactivated and no longer provisioned; history stays."""
    with transaction.atomic():
        if user.is_active:
            user_deactivate(user=user, actor=ACTOR)
        UserIdentity.objects.filter(user=user).update(scim_provisioned=False)
        user.scim_groups.clear()
        sso_apply_groups(user=user, groups=(), actor=ACTOR)


# --- Deactivation ----------------------------------------------------------------------------


def _end_sessions(user: User) -> int:
    # Sessions are keyed by random ids, not by user: decode the live ones. Deactivation
    # is rare and the table holds live sessions only (clearsessions), so a scan is fine;
    # is_active=False already makes every request of this user anonymous meanwhile.
    ended = []
    for session in Session.objects.filter(expire_date__gt=timezone.now()).iterator():
        if str(session.get_decoded().get("_auth_user_id")) == str(user.id):
            ended.append(session.session_key)
    Session.objects.filter(session_key__in=ended).delete()
    return len(ended)


def user_deactivate(*, user: User, actor: str) -> User:
    """Sign the person out everywhere and suspend the keys they own, until reactivation."""
    with transaction.atomic():
        locked = User.objects.select_for_update().get(id=user.id)
        before = _snapshot(locked)
        locked.is_active = False
        locked.save(update_fields=["is_active"])
        now = timezone.now()
        suspended = list(
            VirtualKey.objects.filter(
                owner=locked, revoked_at__isnull=True, suspended_at__isnull=True
            ).values_list("id", flat=True)
        )
        VirtualKey.objects.filter(id__in=suspended).update(suspended_at=now, updated_at=now)
        sessions = _end_sessions(locked)
        audit(
            actor=actor,
            action="deactivate",
            obj=locked,
            before=before,
            after={**_snapshot(locked), "suspended_key_ids": suspended, "sessions_ended": sessions},
        )
    user.is_active = False
    return user


def user_reactivate(*, user: User, actor: str) -> User:
    """Undo a deactivation: the keys it suspended work again (revoked ones stay revoked)."""
    with transaction.atomic():
        locked = User.objects.select_for_update().get(id=user.id)
        before = _snapshot(locked)
        locked.is_active = True
        locked.save(update_fields=["is_active"])
        restored = list(
            VirtualKey.objects.filter(owner=locked, suspended_at__isnull=False).values_list(
                "id", flat=True
            )
        )
        VirtualKey.objects.filter(id__in=restored).update(
            suspended_at=None, updated_at=timezone.now()
        )
        audit(
            actor=actor,
            action="reactivate",
            obj=locked,
            before=before,
            after={**_snapshot(locked), "restored_key_ids": restored},
        )
    user.is_active = True
    return user


# --- Groups ------------------------------------------------------------------------------

GROUP_FILTERS = {
    "displayname": "display_name__iexact",
    "externalid": "external_id",
}


def scim_group_get(*, scim_id: str) -> ScimGroup:
    try:
        gid = uuid.UUID(scim_id)
    except ValueError:
        raise ScimError(404, f"No group {scim_id}.") from None
    group = ScimGroup.objects.filter(scim_id=gid).first()
    if group is None:
        raise ScimError(404, f"No group {scim_id}.")
    return group


def group_to_scim(group: ScimGroup, base_url: str) -> dict[str, Any]:
    members = group.members.select_related("identity").all()
    body: dict[str, Any] = {
        "schemas": [GROUP_SCHEMA],
        "id": str(group.scim_id),
        "displayName": group.display_name,
        "members": [
            {
                "value": str(u.identity.scim_id),
                "display": u.username,
                "$ref": f"{base_url}/Users/{u.identity.scim_id}",
            }
            for u in members
        ],
        "meta": {
            "resourceType": "Group",
            "created": group.created_at.isoformat(),
            "lastModified": group.updated_at.isoformat(),
            "location": f"{base_url}/Groups/{group.scim_id}",
        },
    }
    if group.external_id:
        body["externalId"] = group.external_id
    return body


def _member_users(values: Any) -> list[User]:
    if values is None:
        return []
    if isinstance(values, dict):
        values = [values]
    if not isinstance(values, list):
        raise ScimError(400, "members must be a list of {value: user id}.", "invalidValue")
    users = []
    for item in values:
        ref = item.get("value") if isinstance(item, dict) else item
        users.append(scim_user_get(scim_id=str(ref)))
    return users


def _resync(users: Iterable[User]) -> None:
    for user in {u.id: u for u in users}.values():
        sso_apply_groups(user=user, groups=scim_groups_of(user), actor=ACTOR)


def _display_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ScimError(400, "displayName is required.", "invalidValue")
    return value.strip()[:256]


def _name_taken(name: str, group_id: int | None) -> bool:
    same = ScimGroup.objects.filter(display_name__iexact=name)
    return (same.exclude(id=group_id) if group_id is not None else same).exists()


def scim_group_create(*, data: Mapping[str, Any]) -> ScimGroup:
    name = _display_name(data.get("displayName"))
    if _name_taken(name, None):
        raise ScimError(409, f"A group named {name!r} exists.", "uniqueness")
    members = _member_users(data.get("members"))
    with transaction.atomic():
        group = ScimGroup.objects.create(
            display_name=name, external_id=str(data.get("externalId") or "")[:255]
        )
        group.members.set(members)
        audit(actor=ACTOR, action="create", obj=group, before=None, after=_group_snapshot(group))
        _resync(members)
    return group


def _group_snapshot(group: ScimGroup) -> dict[str, Any]:
    return {
        "display_name": group.display_name,
        "external_id": group.external_id,
        "members": sorted(group.members.values_list("username", flat=True)),
    }


def _save_group(group: ScimGroup, members_before: set[int], before: dict[str, Any]) -> ScimGroup:
    if _name_taken(group.display_name, group.id):
        raise ScimError(409, f"A group named {group.display_name!r} exists.", "uniqueness")
    group.save(update_fields=["display_name", "external_id", "updated_at"])
    after = _group_snapshot(group)
    if after != before:
        audit(actor=ACTOR, action="update", obj=group, before=before, after=after)
    members_now = set(group.members.values_list("id", flat=True))
    # A rename changes what every member holds; otherwise only who came or went.
    touched = (
        members_before | members_now
        if before["display_name"] != group.display_name
        else (members_before ^ members_now)
    )
    _resync(User.objects.filter(id__in=touched))
    return group


def scim_group_replace(*, group: ScimGroup, data: Mapping[str, Any]) -> ScimGroup:
    with transaction.atomic():
        before, members_before = (
            _group_snapshot(group),
            set(group.members.values_list("id", flat=True)),
        )
        group.display_name = _display_name(data.get("displayName"))
        group.external_id = str(data.get("externalId") or "")[:255]
        group.members.set(_member_users(data.get("members")))
        return _save_group(group, members_before, before)


_MEMBER_PATH = re.compile(r'^members\[value eq "([^"]+)"\]$', re.IGNORECASE)


def scim_group_patch(*, group: ScimGroup, body: Mapping[str, Any]) -> ScimGroup:
    with transaction.atomic():
        before, members_before = (
            _group_snapshot(group),
            set(group.members.values_list("id", flat=True)),
        )
        for op in _operations(body):
            path, value = str(op.get("path") or ""), op.get("value")
            member_match = _MEMBER_PATH.match(path)
            if member_match and op["op"] == "remove":
                group.members.remove(*_member_users([member_match.group(1)]))
            elif path.lower() == "members":
                users = _member_users(value)
                if op["op"] == "add":
                    group.members.add(*users)
                elif op["op"] == "remove":
                    if value:
                        group.members.remove(*users)
                    else:  # no value: every member goes (RFC 7644 §3.5.2.2)
                        group.members.clear()
                else:
                    group.members.set(users)
            elif path.lower() == "displayname":
                group.display_name = _display_name(value)
            elif path.lower() == "externalid":
                group.external_id = str(value or "")[:255]
            elif not path and isinstance(value, dict):
                for attr, item in value.items():
                    if attr.lower() == "displayname":
                        group.display_name = _display_name(item)
                    elif attr.lower() == "externalid":
                        group.external_id = str(item or "")[:255]
                    elif attr.lower() == "members":
                        users = _member_users(item)
                        if op["op"] == "add":
                            group.members.add(*users)
                        else:
                            group.members.set(users)
                    # "id" (Okta sends it back) and unknown attributes are ignored.
            else:
                raise ScimError(400, f"Unsupported PATCH path {path!r} on a Group.", "invalidPath")
        return _save_group(group, members_before, before)


def scim_group_delete(*, group: ScimGroup) -> None:
    with transaction.atomic():
        members = list(group.members.all())
        before, pk = _group_snapshot(group), group.pk
        group.delete()
        group.pk = pk
        audit(actor=ACTOR, action="delete", obj=group, before=before)
        _resync(members)


# --- Discovery -------------------------------------------------------------------------------


def service_provider_config(base_url: str) -> dict[str, Any]:
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "patch": {"supported": True},
        "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": True, "maxResults": MAX_COUNT},
        "changePassword": {"supported": False},
        "sort": {"supported": False},
        "etag": {"supported": False},
        "authenticationSchemes": [
            {
                "type": "oauthbearertoken",
                "name": "Bearer token",
                "description": "Authorization: Bearer $GATEWAY_SCIM_TOKEN",
                "primary": True,
            }
        ],
        "meta": {
            "resourceType": "ServiceProviderConfig",
            "location": f"{base_url}/ServiceProviderConfig",
        },
    }


def resource_types(base_url: str) -> list[dict[str, Any]]:
    return [
        {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "User",
            "name": "User",
            "endpoint": "/Users",
            "schema": USER_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": f"{base_url}/ResourceTypes/User"},
        },
        {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "Group",
            "name": "Group",
            "endpoint": "/Groups",
            "schema": GROUP_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": f"{base_url}/ResourceTypes/Group"},
        },
    ]


def _attr(name: str, type_: str = "string", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": type_,
        "multiValued": False,
        "required": False,
        "caseExact": False,
        "mutability": "readWrite",
        "returned": "default",
        "uniqueness": "none",
        **extra,
    }


def schemas(base_url: str) -> list[dict[str, Any]]:
    return [
        {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": USER_SCHEMA,
            "name": "User",
            "attributes": [
                _attr("userName", required=True, uniqueness="server"),
                _attr("externalId"),
                _attr("name", "complex", subAttributes=[_attr("givenName"), _attr("familyName")]),
                _attr(
                    "emails",
                    "complex",
                    multiValued=True,
                    subAttributes=[_attr("value"), _attr("type"), _attr("primary", "boolean")],
                ),
                _attr("active", "boolean"),
                _attr("groups", "complex", multiValued=True, mutability="readOnly"),
            ],
            "meta": {"resourceType": "Schema", "location": f"{base_url}/Schemas/{USER_SCHEMA}"},
        },
        {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": GROUP_SCHEMA,
            "name": "Group",
            "attributes": [
                _attr("displayName", required=True, uniqueness="server"),
                _attr("externalId"),
                _attr(
                    "members",
                    "complex",
                    multiValued=True,
                    subAttributes=[_attr("value", mutability="immutable"), _attr("display")],
                ),
            ],
            "meta": {"resourceType": "Schema", "location": f"{base_url}/Schemas/{GROUP_SCHEMA}"},
        },
    ]
