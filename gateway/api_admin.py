"""The management API under /api/admin: models, teams and keys.

Authenticated with `Authorization: Bearer $GATEWAY_ADMIN_TOKEN`; disabled while
that setting is empty. Endpoints parse, call a service, and shape the output.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Query, Router, Schema

from accounts import services as account_services
from accounts.models import KeySecret, Team, VirtualKey
from core.api import ADMIN_ACTOR, AdminToken, ErrorOut, Page, PageParams
from core.errors import GatewayError, invalid_request
from gateway import selectors, services
from gateway.models import ModelDeployment
from gateway.schemas import (
    AliasIn,
    AliasOut,
    GroupIn,
    GroupOut,
    KeyCreatedOut,
    KeyIn,
    KeyOut,
    KeyPatch,
    ModelIn,
    ModelOut,
    ModelPatch,
    RotateIn,
    TeamIn,
    TeamOut,
    TeamPatch,
)

router = Router(auth=AdminToken(), tags=["Management"])
ERRORS: dict[int, type[Schema]] = {
    400: ErrorOut,
    401: ErrorOut,
    403: ErrorOut,
    404: ErrorOut,
    409: ErrorOut,
}


def _set_fields(payload: Schema) -> dict[str, Any]:
    return payload.model_dump(exclude_unset=True)


# --- models ------------------------------------------------------------------------------------


def _deployment(model_id: str) -> ModelDeployment:
    try:
        return get_object_or_404(ModelDeployment, public_id=model_id)
    except Exception as exc:
        if isinstance(exc, GatewayError):
            raise
        raise GatewayError(
            f"No model deployment with id {model_id!r}.", 404, code="not_found"
        ) from None


@router.post("/models", response={201: ModelOut, **ERRORS}, summary="Add a model deployment")
def model_create(request: HttpRequest, payload: ModelIn) -> tuple[int, ModelOut]:
    fields = _set_fields(payload)
    deployment = services.deployment_create(actor=ADMIN_ACTOR, **fields)
    return 201, ModelOut.of(deployment)


@router.get("/models", response=Page[ModelOut], summary="List model deployments")
def model_list(request: HttpRequest, page: Query[PageParams], name: str | None = None) -> Any:
    rows = ModelDeployment.objects.all()
    if name:
        rows = rows.filter(name=name)
    return page.of(rows, ModelOut.of)


@router.get("/models/{model_id}", response={200: ModelOut, **ERRORS})
def model_get(request: HttpRequest, model_id: str) -> ModelOut:
    return ModelOut.of(_deployment(model_id))


@router.api_operation(["PATCH", "PUT"], "/models/{model_id}", response={200: ModelOut, **ERRORS})
def model_update(request: HttpRequest, model_id: str, payload: ModelPatch) -> ModelOut:
    fields = _set_fields(payload)
    return ModelOut.of(
        services.deployment_update(actor=ADMIN_ACTOR, deployment=_deployment(model_id), **fields)
    )


@router.delete("/models/{model_id}", response={204: None, **ERRORS})
def model_delete(request: HttpRequest, model_id: str) -> tuple[int, None]:
    services.deployment_delete(actor=ADMIN_ACTOR, deployment=_deployment(model_id))
    return 204, None


# --- teams -------------------------------------------------------------------------------------


def _team(team_id: int) -> Team:
    team = Team.objects.filter(id=team_id).first()
    if team is None:
        raise GatewayError(f"No team with id {team_id}.", 404, code="not_found", param="team_id")
    return team


def _team_fields(fields: dict[str, Any]) -> dict[str, Any]:
    if "budget_usd" in fields:
        fields["budget_micro_usd"] = services.money_to_micro(fields.pop("budget_usd"))
    if "member_key_max_budget_usd" in fields:
        fields["member_key_max_budget_micro_usd"] = services.money_to_micro(
            fields.pop("member_key_max_budget_usd")
        )
    if "member_key_allowed_models" in fields and fields["member_key_allowed_models"] is None:
        fields["member_key_allowed_models"] = []  # null: no cap, as an empty list
    if "sso_groups" in fields and fields["sso_groups"] is None:
        fields["sso_groups"] = {}  # null: no groups
    if "markup_percent" in fields and fields["markup_percent"] is None:
        fields.pop("markup_percent")
    for name in ("budget_period", "timezone", "alert_thresholds", "metadata", "name"):
        if name in fields and fields[name] is None:
            raise invalid_request(f"'{name}' cannot be null.", param=name)
    return fields


@router.post("/teams", response={201: TeamOut, **ERRORS}, summary="Create a team")
def team_create(request: HttpRequest, payload: TeamIn) -> tuple[int, TeamOut]:
    team = account_services.team_create(actor=ADMIN_ACTOR, **_team_fields(_set_fields(payload)))
    return 201, TeamOut.of(team)


@router.get("/teams", response=Page[TeamOut])
def team_list(request: HttpRequest, page: Query[PageParams]) -> Any:
    return page.of(Team.objects.all(), TeamOut.of)


@router.get("/teams/{team_id}", response={200: TeamOut, **ERRORS})
def team_get(request: HttpRequest, team_id: int) -> TeamOut:
    return TeamOut.of(_team(team_id))


@router.api_operation(["PATCH", "PUT"], "/teams/{team_id}", response={200: TeamOut, **ERRORS})
def team_update(request: HttpRequest, team_id: int, payload: TeamPatch) -> TeamOut:
    team = account_services.team_update(
        actor=ADMIN_ACTOR, team=_team(team_id), **_team_fields(_set_fields(payload))
    )
    return TeamOut.of(team)


@router.delete("/teams/{team_id}", response={204: None, **ERRORS})
def team_delete(request: HttpRequest, team_id: int) -> tuple[int, None]:
    account_services.team_delete(actor=ADMIN_ACTOR, team=_team(team_id))
    return 204, None


# --- keys ----------------------------------------------------------------------------------------


def _keys() -> QuerySet[VirtualKey]:
    newest = KeySecret.objects.order_by("-created_at")
    return VirtualKey.objects.prefetch_related(Prefetch("secrets", queryset=newest))


def _key(key_id: int) -> VirtualKey:
    key = _keys().filter(id=key_id).first()
    if key is None:
        raise GatewayError(f"No key with id {key_id}.", 404, code="not_found")
    return key


def _key_out(key: VirtualKey) -> KeyOut:
    secrets = list(key.secrets.all())
    return KeyOut.of(key, secrets[0] if secrets else None)


def _key_fields(fields: dict[str, Any]) -> dict[str, Any]:
    if "models" in fields:
        fields["allowed_models"] = list(dict.fromkeys(fields.pop("models") or []))
    if "max_budget_usd" in fields:
        fields["max_budget_micro_usd"] = services.money_to_micro(fields.pop("max_budget_usd"))
    for name in ("budget_period", "metadata", "name"):
        if name in fields and fields[name] is None:
            raise invalid_request(f"'{name}' cannot be null.", param=name)
    return fields


@router.post("/keys", response={201: KeyCreatedOut, **ERRORS}, summary="Issue a virtual key")
def key_create(request: HttpRequest, payload: KeyIn) -> tuple[int, KeyCreatedOut]:
    fields = _set_fields(payload)
    team = _team(fields.pop("team_id"))
    issued = account_services.key_create(actor=ADMIN_ACTOR, team=team, **_key_fields(fields))
    out = _key_out(_key(issued.key.id))
    return 201, KeyCreatedOut(**out.model_dump(), key=issued.secret)


class KeyFilter(Schema):
    team_id: int | None = None
    revoked: bool | None = None


@router.get("/keys", response=Page[KeyOut], summary="List keys (never their secrets)")
def key_list(request: HttpRequest, page: Query[PageParams], filters: Query[KeyFilter]) -> Any:
    keys = _keys()
    if filters.team_id is not None:
        keys = keys.filter(team_id=filters.team_id)
    if filters.revoked is not None:
        keys = keys.filter(revoked_at__isnull=not filters.revoked)
    return page.of(keys, _key_out)


@router.get("/keys/{key_id}", response={200: KeyOut, **ERRORS})
def key_get(request: HttpRequest, key_id: int) -> KeyOut:
    return _key_out(_key(key_id))


@router.api_operation(["PATCH", "PUT"], "/keys/{key_id}", response={200: KeyOut, **ERRORS})
def key_update(request: HttpRequest, key_id: int, payload: KeyPatch) -> KeyOut:
    key = account_services.key_update(
        actor=ADMIN_ACTOR, key=_key(key_id), **_key_fields(_set_fields(payload))
    )
    return _key_out(_key(key.id))


@router.delete("/keys/{key_id}", response={200: KeyOut, **ERRORS}, summary="Revoke a key")
def key_revoke(request: HttpRequest, key_id: int) -> KeyOut:
    key = account_services.key_revoke(actor=ADMIN_ACTOR, key=_key(key_id))
    return _key_out(_key(key.id))


@router.post(
    "/keys/{key_id}/rotate", response={201: KeyCreatedOut, **ERRORS}, summary="Rotate a key"
)
def key_rotate(
    request: HttpRequest, key_id: int, payload: RotateIn | None = None
) -> tuple[int, KeyCreatedOut]:
    grace = payload.grace_period_seconds if payload else 0
    issued = account_services.key_rotate(actor=ADMIN_ACTOR, key=_key(key_id), grace_seconds=grace)
    out = _key_out(_key(issued.key.id))
    return 201, KeyCreatedOut(**out.model_dump(), key=issued.secret)


# --- model groups (routing policy) and aliases -----------------------------------------------


@router.get("/model-groups", response=Page[GroupOut], summary="List routing policies")
def group_list(request: HttpRequest, page: Query[PageParams]) -> Any:
    return page.of(selectors.groups(), GroupOut.of)


@router.get("/model-groups/{path:name}", response={200: GroupOut, **ERRORS})
def group_get(request: HttpRequest, name: str) -> GroupOut:
    group = selectors.group_get(name)
    if group is None:
        raise GatewayError(
            f"No routing policy for '{name}'; it uses the defaults.", 404, code="not_found"
        )
    return GroupOut.of(group)


@router.put(
    "/model-groups/{path:name}",
    response={200: GroupOut, **ERRORS},
    summary="Set a model's routing policy: strategy, fallbacks, retries, cooldown",
)
def group_put(request: HttpRequest, name: str, payload: GroupIn) -> GroupOut:
    if not selectors.model_exists(name):
        raise GatewayError(
            f"No model named '{name}'; add a deployment first.", 404, code="not_found"
        )
    fields = {k: v for k, v in _set_fields(payload).items() if v is not None}
    return GroupOut.of(services.group_save(actor=ADMIN_ACTOR, name=name, **fields))


@router.delete("/model-groups/{path:name}", response={204: None, **ERRORS})
def group_delete(request: HttpRequest, name: str) -> tuple[int, None]:
    group = selectors.group_get(name)
    if group is None:
        raise GatewayError(f"No routing policy for '{name}'.", 404, code="not_found")
    services.group_delete(actor=ADMIN_ACTOR, group=group)
    return 204, None


@router.post("/aliases", response={201: AliasOut, **ERRORS}, summary="Add a model alias")
def alias_create(request: HttpRequest, payload: AliasIn) -> tuple[int, AliasOut]:
    return 201, AliasOut.of(
        services.alias_create(actor=ADMIN_ACTOR, alias=payload.alias, target=payload.target)
    )


@router.get("/aliases", response=Page[AliasOut])
def alias_list(request: HttpRequest, page: Query[PageParams]) -> Any:
    return page.of(selectors.aliases(), AliasOut.of)


@router.delete("/aliases/{path:alias}", response={204: None, **ERRORS})
def alias_delete(request: HttpRequest, alias: str) -> tuple[int, None]:
    found = selectors.alias_named(alias)
    if found is None:
        raise GatewayError(f"No alias '{alias}'.", 404, code="not_found")
    services.alias_delete(actor=ADMIN_ACTOR, alias=found)
    return 204, None
