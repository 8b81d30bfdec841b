"""Schemas of the management API. Money is a decimal string in USD ("12.500000")."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from ninja import Field, Schema
from pydantic import field_validator

from accounts.models import KeySecret, Team, VirtualKey
from billing.pricing import micro_usd_to_str
from gateway.models import ModelAlias, ModelDeployment, ModelGroup

Period = Literal["daily", "weekly", "monthly", "total"]
Money = Decimal


def _non_negative(value: Decimal | None, name: str) -> Decimal | None:
    if value is not None and (value < 0 or not value.is_finite()):
        raise ValueError(f"{name} must be 0 or more")
    return value


def _money_out(micro: int | None) -> str | None:
    return None if micro is None else micro_usd_to_str(micro)


def _price_out(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


# --- models (deployments) ----------------------------------------------------------------------

_PRICE_FIELDS = (
    "input_cost_per_million",
    "output_cost_per_million",
    "cached_input_cost_per_million",
    "cache_write_cost_per_million",
    "reasoning_cost_per_million",
)


class ModelPatch(Schema):
    name: str | None = Field(None, min_length=1, max_length=200)
    provider_model: str | None = Field(None, min_length=3, max_length=300)
    api_base: str | None = Field(None, max_length=500)
    api_key: str | None = Field(None, max_length=4000)
    api_version: str | None = Field(None, max_length=64)
    input_cost_per_million: Decimal | None = None
    output_cost_per_million: Decimal | None = None
    cached_input_cost_per_million: Decimal | None = None
    cache_write_cost_per_million: Decimal | None = None
    reasoning_cost_per_million: Decimal | None = None
    context_length: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    rpm_limit: int | None = Field(None, ge=1)
    tpm_limit: int | None = Field(None, ge=1)
    weight: int | None = Field(None, ge=0)
    priority: int | None = Field(None, ge=0)
    timeout_seconds: float | None = Field(None, gt=0, le=3600)
    drop_unsupported_params: bool | None = None
    capabilities: dict[str, bool] | None = None
    enabled: bool | None = None

    @field_validator(*_PRICE_FIELDS)
    @classmethod
    def _prices(cls, value: Decimal | None) -> Decimal | None:
        return _non_negative(value, "a price")


class ModelIn(ModelPatch):
    name: str = Field(..., min_length=1, max_length=200)
    provider_model: str = Field(..., min_length=3, max_length=300)


class ModelOut(Schema):
    id: str
    name: str
    provider_model: str
    api_base: str
    has_api_key: bool
    api_version: str
    input_cost_per_million: str | None
    output_cost_per_million: str | None
    cached_input_cost_per_million: str | None
    cache_write_cost_per_million: str | None
    reasoning_cost_per_million: str | None
    context_length: int | None
    max_output_tokens: int | None
    rpm_limit: int | None
    tpm_limit: int | None
    weight: int
    priority: int | None
    timeout_seconds: float | None
    drop_unsupported_params: bool
    capabilities: dict[str, Any]
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @staticmethod
    def of(row: ModelDeployment) -> ModelOut:
        return ModelOut(
            id=str(row.public_id),
            name=row.name,
            provider_model=row.provider_model,
            api_base=row.api_base,
            has_api_key=bool(row.api_key_encrypted),
            api_version=row.api_version,
            **{name: _price_out(getattr(row, name)) for name in _PRICE_FIELDS},
            context_length=row.context_length,
            max_output_tokens=row.max_output_tokens,
            rpm_limit=row.rpm_limit,
            tpm_limit=row.tpm_limit,
            weight=row.weight,
            priority=row.priority,
            timeout_seconds=row.timeout_seconds,
            drop_unsupported_params=row.drop_unsupported_params,
            capabilities=row.capabilities,
            enabled=row.enabled,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


# --- teams --------------------------------------------------------------------------------


class TeamPatch(Schema):
    name: str | None = Field(None, min_length=1, max_length=200)
    budget_usd: Money | None = None
    budget_period: Period | None = None
    timezone: str | None = Field(None, max_length=64)
    alert_thresholds: list[int] | None = None
    markup_percent: Decimal | None = Field(None, ge=-100, le=1000)
    rpm_limit: int | None = Field(None, ge=1)
    tpm_limit: int | None = Field(None, ge=1)
    cache_ttl_seconds: int | None = Field(None, ge=1, le=30 * 24 * 3600)
    metadata: dict[str, Any] | None = None
    # The member key policy: caps on the keys the team's members issue (null: no cap).
    member_key_max_budget_usd: Money | None = None
    member_key_max_rpm: int | None = Field(None, ge=1)
    member_key_max_tpm: int | None = Field(None, ge=1)
    member_key_allowed_models: list[str] | None = None
    member_key_max_lifetime_days: int | None = Field(None, ge=1, le=36500)
    # IdP groups → the role they give in this team (SSO logins and SCIM apply it).
    sso_groups: dict[str, Literal["member", "admin"]] | None = None

    @field_validator("budget_usd")
    @classmethod
    def _budget(cls, value: Decimal | None) -> Decimal | None:
        return _non_negative(value, "budget_usd")

    @field_validator("member_key_max_budget_usd")
    @classmethod
    def _member_budget(cls, value: Decimal | None) -> Decimal | None:
        return _non_negative(value, "member_key_max_budget_usd")


class TeamIn(TeamPatch):
    name: str = Field(..., min_length=1, max_length=200)


class TeamOut(Schema):
    id: int
    name: str
    budget_usd: str | None
    budget_period: str
    timezone: str
    alert_thresholds: list[int]
    markup_percent: str
    rpm_limit: int | None
    tpm_limit: int | None
    cache_ttl_seconds: int | None
    metadata: dict[str, Any]
    member_key_max_budget_usd: str | None
    member_key_max_rpm: int | None
    member_key_max_tpm: int | None
    member_key_allowed_models: list[str]
    member_key_max_lifetime_days: int | None
    sso_groups: dict[str, str]
    created_at: datetime

    @staticmethod
    def of(team: Team) -> TeamOut:
        return TeamOut(
            id=team.id,
            name=team.name,
            budget_usd=_money_out(team.budget_micro_usd),
            budget_period=team.budget_period,
            timezone=team.timezone,
            alert_thresholds=list(team.alert_thresholds or []),
            # Quantised to the column's 3 places, so a fresh object and a
            # re-read one print the same.
            markup_percent=format(Decimal(team.markup_percent).quantize(Decimal("0.001")), "f"),
            rpm_limit=team.rpm_limit,
            tpm_limit=team.tpm_limit,
            cache_ttl_seconds=team.cache_ttl_seconds,
            metadata=team.metadata,
            member_key_max_budget_usd=_money_out(team.member_key_max_budget_micro_usd),
            member_key_max_rpm=team.member_key_max_rpm,
            member_key_max_tpm=team.member_key_max_tpm,
            member_key_allowed_models=list(team.member_key_allowed_models or []),
            member_key_max_lifetime_days=team.member_key_max_lifetime_days,
            sso_groups=dict(team.sso_groups or {}),
            created_at=team.created_at,
        )


# --- keys --------------------------------------------------------------------------------


class KeyPatch(Schema):
    name: str | None = Field(None, min_length=1, max_length=200)
    models: list[str] | None = None
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None
    max_budget_usd: Money | None = None
    budget_period: Period | None = None
    rpm_limit: int | None = Field(None, ge=1)
    tpm_limit: int | None = Field(None, ge=1)
    cache_ttl_seconds: int | None = Field(None, ge=1, le=30 * 24 * 3600)

    @field_validator("max_budget_usd")
    @classmethod
    def _budget(cls, value: Decimal | None) -> Decimal | None:
        return _non_negative(value, "max_budget_usd")


class KeyIn(KeyPatch):
    team_id: int
    name: str = Field(..., min_length=1, max_length=200)


class RotateIn(Schema):
    grace_period_seconds: int = Field(0, ge=0, le=30 * 24 * 3600)


class KeyOut(Schema):
    id: int
    team_id: int
    name: str
    key_hint: str
    models: list[str]
    expires_at: datetime | None
    revoked: bool
    revoked_at: datetime | None
    metadata: dict[str, Any]
    max_budget_usd: str | None
    budget_period: str
    rpm_limit: int | None
    tpm_limit: int | None
    cache_ttl_seconds: int | None
    created_at: datetime

    @staticmethod
    def of(key: VirtualKey, newest: KeySecret | None = None) -> KeyOut:
        last4 = newest.last4 if newest else "????"
        return KeyOut(
            id=key.id,
            team_id=key.team_id,
            name=key.name,
            key_hint=f"sk-gw-…{last4}",
            models=list(key.allowed_models or []),
            expires_at=key.expires_at,
            revoked=key.revoked_at is not None,
            revoked_at=key.revoked_at,
            metadata=key.metadata,
            max_budget_usd=_money_out(key.max_budget_micro_usd),
            budget_period=key.budget_period,
            rpm_limit=key.rpm_limit,
            tpm_limit=key.tpm_limit,
            cache_ttl_seconds=key.cache_ttl_seconds,
            created_at=key.created_at,
        )


class KeyCreatedOut(KeyOut):
    key: str = Field(..., description="The secret. Shown this once only; store it now.")


# --- model groups and aliases -------------------------------------------------------------------

Strategy = Literal["simple-shuffle", "least-busy", "latency-based-routing", "cost-based-routing"]


class GroupIn(Schema):
    routing_strategy: Strategy | None = None
    fallbacks: list[str] | None = None
    context_window_fallbacks: list[str] | None = None
    content_policy_fallbacks: list[str] | None = None
    num_retries: int | None = Field(None, ge=0, le=10)
    retry_backoff_seconds: float | None = Field(None, ge=0, le=60)
    max_retry_after_seconds: float | None = Field(None, ge=0, le=600)
    allowed_fails: int | None = Field(None, ge=1, le=1000)
    cooldown_seconds: float | None = Field(None, ge=0, le=3600)


class GroupOut(Schema):
    name: str
    routing_strategy: str
    fallbacks: list[str]
    context_window_fallbacks: list[str]
    content_policy_fallbacks: list[str]
    num_retries: int
    retry_backoff_seconds: float
    max_retry_after_seconds: float
    allowed_fails: int
    cooldown_seconds: float
    updated_at: datetime

    @staticmethod
    def of(group: ModelGroup) -> GroupOut:
        return GroupOut(
            name=group.name,
            routing_strategy=group.routing_strategy,
            fallbacks=list(group.fallbacks),
            context_window_fallbacks=list(group.context_window_fallbacks),
            content_policy_fallbacks=list(group.content_policy_fallbacks),
            num_retries=group.num_retries,
            retry_backoff_seconds=group.retry_backoff_seconds,
            max_retry_after_seconds=group.max_retry_after_seconds,
            allowed_fails=group.allowed_fails,
            cooldown_seconds=group.cooldown_seconds,
            updated_at=group.updated_at,
        )


class AliasIn(Schema):
    alias: str = Field(..., min_length=1, max_length=200)
    target: str = Field(..., min_length=1, max_length=200)


class AliasOut(Schema):
    alias: str
    target: str
    created_at: datetime

    @staticmethod
    def of(alias: ModelAlias) -> AliasOut:
        return AliasOut(alias=alias.alias, target=alias.target, created_at=alias.created_at)
