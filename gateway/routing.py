"""The routing table: deployments from the database, and the litellm Router over them.

Built once per process and rebuilt only when the configuration token changes
(checked at most every GATEWAY_CONFIG_POLL_SECONDS), so a model added in the admin
reaches every process without a restart and no request pays for a rebuild.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import litellm
from django.conf import settings

from accounts.auth import KeyPrincipal
from billing.pricing import ZERO, Prices, per_million_from_per_token
from core.crypto import decrypt_secret
from core.db import run_db
from core.errors import GatewayError
from gateway.destinations import api_base_problem
from gateway.models import ConfigVersion, ModelAlias, ModelDeployment, ModelGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    name: str
    provider_model: str
    provider: str
    # The model name as the provider knows it (provider prefix removed).
    upstream_model: str
    api_base: str
    api_key: str = field(repr=False)
    api_version: str
    timeout_seconds: float
    prices: Prices
    context_length: int | None
    max_output_tokens: int | None
    capabilities: dict[str, bool]
    drop_unsupported_params: bool
    mode: str
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    # What the provider bills a line of its batch API (see batch_prices()).
    batch_prices: Prices | None = None
    # "cost_map": litellm's *_batches prices; "half_live": the map has none, so half
    # the live prices (what OpenAI and Anthropic batches cost today).
    batch_price_source: str = ""

    @property
    def native_batches(self) -> bool:
        """Whether batches for this deployment can go to its provider's own batch API."""
        return self.provider in NATIVE_BATCH_PROVIDERS and self.capabilities.get(
            "native_batches", True
        )


# Providers with a batch API the gateway drives (gateway.native_batches).
NATIVE_BATCH_PROVIDERS = frozenset({"openai", "azure", "anthropic"})
HALF = Decimal("0.5")


def batch_prices(entry: dict[str, Any], live: Prices) -> tuple[Prices, str]:
    """The prices of a provider batch line, and where they came from.

    litellm's map has input_cost_per_token_batches / output_cost_per_token_batches for
    the models whose provider publishes batch prices. Token kinds it has no batch price
    for (cached reads, cache writes) are half their live price, as both providers bill
    them; a model the map has no batch prices for is half its live prices throughout.
    """
    batch_in = per_million_from_per_token(entry.get("input_cost_per_token_batches"))
    batch_out = per_million_from_per_token(entry.get("output_cost_per_token_batches"))
    halved = Prices(
        input=live.input * HALF,
        output=live.output * HALF,
        cached_input=live.cached_input * HALF,
        cache_write=live.cache_write * HALF,
        reasoning=live.reasoning * HALF,
    )
    if batch_in is None or batch_out is None:
        return halved, "half_live"
    # Reasoning tokens are output tokens to both providers.
    return (
        Prices(batch_in, batch_out, halved.cached_input, halved.cache_write, batch_out),
        "cost_map",
    )


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    """How one public model is routed; defaults apply to a model with no ModelGroup row."""

    strategy: str = "simple-shuffle"
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    num_retries: int = 2
    retry_backoff_seconds: float = 0.5
    max_retry_after_seconds: float = 10.0
    allowed_fails: int = 3
    cooldown_seconds: float = 10.0


DEFAULT_POLICY = GroupPolicy()


@dataclass
class RoutingTable:
    token: str
    # One litellm Router per public model, each with that model's routing strategy.
    routers: dict[str, Any] = field(default_factory=dict)
    deployments: dict[str, Deployment] = field(default_factory=dict)
    groups: dict[str, list[Deployment]] = field(default_factory=dict)
    policies: dict[str, GroupPolicy] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # Public model name → when its first deployment was created (epoch seconds).
    created: dict[str, int] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        """The model group a public name (or alias) is served by."""
        return name if name in self.groups else self.aliases.get(name, name)

    def group(self, name: str) -> list[Deployment]:
        return self.groups.get(self.resolve(name), [])

    def policy(self, name: str) -> GroupPolicy:
        return self.policies.get(self.resolve(name), DEFAULT_POLICY)

    def router(self, name: str) -> Any:
        return self.routers.get(self.resolve(name))

    def may_use(self, principal: KeyPrincipal, name: str) -> bool:
        """A key allowed a model may call it under its aliases too, and the reverse."""
        return principal.may_use(name) or principal.may_use(self.resolve(name))

    def public_names(self) -> list[str]:
        names = set(self.groups) | {
            a for a, target in self.aliases.items() if target in self.groups
        }
        return sorted(names)

    def max_prices(self, *names: str) -> Prices:
        """The highest price of each kind across groups: what admission reserves at."""
        members = [d for name in names for d in self.group(name)]
        if not members:
            return Prices(ZERO, ZERO, ZERO, ZERO, ZERO)
        return Prices(
            input=max(d.prices.input for d in members),
            output=max(d.prices.output for d in members),
            cached_input=max(d.prices.cached_input for d in members),
            cache_write=max(d.prices.cache_write for d in members),
            reasoning=max(d.prices.reasoning for d in members),
        )

    def max_output_tokens(self, *names: str) -> int | None:
        limits = [d.max_output_tokens for n in names for d in self.group(n) if d.max_output_tokens]
        return max(limits) if limits else None


def split_provider(provider_model: str) -> tuple[str, str]:
    """('openai', 'gpt-4o-mini') for 'openai/gpt-4o-mini'; raises ValueError if unknown."""
    try:
        model, provider, _, _ = litellm.get_llm_provider(provider_model)
    except Exception as exc:
        raise ValueError(
            f"{provider_model!r} is not a model litellm can route; use the 'provider/model' "
            "form, e.g. 'openai/gpt-4o-mini' or 'anthropic/claude-3-5-haiku-20241022'."
        ) from exc
    return provider, model


def provider_model_problem(provider_model: str) -> str | None:
    """Why `provider_model` may not be a deployment's provider model, or None when it may."""
    try:
        split_provider(provider_model)
    except ValueError as exc:
        return str(exc)
    return None


def _price_map_entry(provider_model: str, provider: str, model: str) -> dict[str, Any]:
    for candidate in (provider_model, model, f"{provider}/{model}"):
        entry = litellm.model_cost.get(candidate)
        if entry:
            return dict(entry)
    return {}


def _pick(override: Decimal | None, fallback: Decimal | None) -> Decimal:
    if override is not None:
        return override
    return fallback if fallback is not None else ZERO


def snapshot(row: ModelDeployment) -> Deployment:
    provider, model = split_provider(row.provider_model)
    entry = _price_map_entry(row.provider_model, provider, model)
    input_price = _pick(
        row.input_cost_per_million, per_million_from_per_token(entry.get("input_cost_per_token"))
    )
    output_price = _pick(
        row.output_cost_per_million, per_million_from_per_token(entry.get("output_cost_per_token"))
    )
    prices = Prices(
        input=input_price,
        output=output_price,
        cached_input=_pick(
            row.cached_input_cost_per_million,
            per_million_from_per_token(entry.get("cache_read_input_token_cost")) or input_price,
        ),
        cache_write=_pick(
            row.cache_write_cost_per_million,
            per_million_from_per_token(entry.get("cache_creation_input_token_cost")) or input_price,
        ),
        reasoning=_pick(
            row.reasoning_cost_per_million,
            per_million_from_per_token(entry.get("output_cost_per_reasoning_token"))
            or output_price,
        ),
    )
    capabilities = {
        "function_calling": bool(entry.get("supports_function_calling", True)),
        "vision": bool(entry.get("supports_vision", False)),
        "streaming": True,
        "structured_output": bool(entry.get("supports_response_schema", True)),
    }
    capabilities.update({k: bool(v) for k, v in (row.capabilities or {}).items()})
    # An admin's own price for a model overrides the map's batch prices too: half of it.
    overridden = row.input_cost_per_million is not None or row.output_cost_per_million is not None
    in_batch, source = batch_prices({} if overridden else entry, prices)
    return Deployment(
        id=str(row.public_id),
        name=row.name,
        provider_model=row.provider_model,
        provider=provider,
        upstream_model=model,
        api_base=row.api_base,
        api_key=decrypt_secret(row.api_key_encrypted),
        api_version=row.api_version,
        timeout_seconds=row.timeout_seconds or settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS,
        prices=prices,
        context_length=row.context_length or entry.get("max_input_tokens"),
        max_output_tokens=row.max_output_tokens or entry.get("max_output_tokens"),
        capabilities=capabilities,
        drop_unsupported_params=row.drop_unsupported_params,
        mode=str(entry.get("mode") or ("embedding" if "embed" in row.provider_model else "chat")),
        rpm_limit=row.rpm_limit,
        tpm_limit=row.tpm_limit,
        batch_prices=in_batch,
        batch_price_source=source,
    )


def _litellm_entry(row: ModelDeployment, deployment: Deployment) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": row.provider_model,
        # litellm's OpenAI client insists on some key, even for local servers without auth.
        "api_key": deployment.api_key or "no-key",
        "timeout": deployment.timeout_seconds,
        "weight": row.weight,
        "drop_params": row.drop_unsupported_params,
        "max_retries": 0,
    }
    if row.api_base:
        params["api_base"] = row.api_base
    if row.api_version:
        params["api_version"] = row.api_version
    if row.priority is not None:
        params["order"] = row.priority
    # Cost-based routing ranks deployments by these (litellm wants USD per token).
    params["input_cost_per_token"] = float(deployment.prices.input) / 1_000_000
    params["output_cost_per_token"] = float(deployment.prices.output) / 1_000_000
    return {
        "model_name": row.name,
        "litellm_params": params,
        "model_info": {"id": deployment.id},
    }


@dataclass
class _Config:
    token: str
    rows: list[ModelDeployment]
    groups: list[ModelGroup]
    aliases: list[ModelAlias]


def _load_config() -> _Config:
    return _Config(
        token=_current_token(),
        rows=list(ModelDeployment.objects.filter(enabled=True).order_by("name", "id")),
        groups=list(ModelGroup.objects.all()),
        aliases=list(ModelAlias.objects.all()),
    )


def _current_token() -> str:
    token = ConfigVersion.objects.filter(singleton=True).values_list("token", flat=True).first()
    return token or ""


def _policy(row: ModelGroup) -> GroupPolicy:
    return GroupPolicy(
        strategy=row.routing_strategy,
        fallbacks=tuple(row.fallbacks or ()),
        context_window_fallbacks=tuple(row.context_window_fallbacks or ()),
        content_policy_fallbacks=tuple(row.content_policy_fallbacks or ()),
        num_retries=row.num_retries,
        retry_backoff_seconds=row.retry_backoff_seconds,
        max_retry_after_seconds=row.max_retry_after_seconds,
        allowed_fails=row.allowed_fails,
        cooldown_seconds=row.cooldown_seconds,
    )


def build_table(config: _Config) -> RoutingTable:
    table = RoutingTable(token=config.token)
    entries: dict[str, list[dict[str, Any]]] = {}
    for row in config.rows:
        problem = api_base_problem(row.api_base)
        if problem:
            # Saved before the rule existed (or the allow-list shrank): never called.
            logger.error("skipping deployment %s (%s): %s", row.public_id, row.name, problem)
            continue
        try:
            deployment = snapshot(row)
            entry = _litellm_entry(row, deployment)
        except Exception:
            # One broken deployment must not take every model down with it.
            logger.exception("skipping deployment %s (%s)", row.public_id, row.name)
            continue
        table.deployments[deployment.id] = deployment
        table.groups.setdefault(deployment.name, []).append(deployment)
        entries.setdefault(deployment.name, []).append(entry)
        created = int(row.created_at.timestamp())
        table.created[deployment.name] = min(table.created.get(deployment.name, created), created)
    table.policies = {group.name: _policy(group) for group in config.groups}
    table.aliases = {alias.alias: alias.target for alias in config.aliases}
    for name, model_list in entries.items():
        table.routers[name] = litellm.Router(
            model_list=model_list,
            routing_strategy=table.policies.get(name, DEFAULT_POLICY).strategy,
            num_retries=0,
            # Cooldowns are opened by the gateway's own circuit breaker (gateway.breaker).
            allowed_fails=1_000_000,
            timeout=settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS,
            set_verbose=False,
        )
    return table


class RoutingTableHolder:
    def __init__(self) -> None:
        self._table: RoutingTable | None = None
        self._checked_at = 0.0
        self._lock: asyncio.Lock | None = None

    def invalidate(self) -> None:
        self._checked_at = 0.0

    async def get(self) -> RoutingTable:
        now = time.monotonic()
        table = self._table
        if table is not None and now - self._checked_at < settings.GATEWAY_CONFIG_POLL_SECONDS:
            return table
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if (
                self._table is not None
                and time.monotonic() - self._checked_at < settings.GATEWAY_CONFIG_POLL_SECONDS
            ):
                return self._table
            try:
                token = await run_db(_current_token)
                if self._table is None or token != self._table.token:
                    self._table = build_table(await run_db(_load_config))
            except Exception as exc:
                if self._table is None:
                    raise GatewayError(
                        "The gateway cannot load its model configuration (database "
                        "unreachable); retry shortly.",
                        503,
                        "server_error",
                        "database_unavailable",
                    ) from exc
                # Keep serving the configuration we have; check again next interval.
                logger.warning("configuration check failed (%s); keeping the current table", exc)
            self._checked_at = time.monotonic()
            return self._table


routing_tables = RoutingTableHolder()


def configured_unit_prices() -> Iterator[tuple[str, str, Prices]]:
    """(provider, public model, prices) of every enabled deployment, for invoices."""
    for row in ModelDeployment.objects.filter(enabled=True).order_by("id"):
        try:
            deployment = snapshot(row)
        except Exception:  # noqa: S112 - informational only; a broken row must not block billing
            continue
        yield deployment.provider, row.name, deployment.prices
