"""Choosing a deployment, and what each attempt teaches the router.

litellm's Router picks among a model's deployments with the model's strategy
(weighted shuffle, least-busy, latency, cost) and skips deployments in cooldown.
Because the gateway makes the provider calls itself, it tells the router what
happened: in-flight counts and latencies for the strategies, and a cooldown when
a deployment keeps failing (a circuit breaker: after `allowed_fails` failures in a
row it is skipped for `cooldown_seconds`, then tried again).

Per-deployment rpm/tpm limits are counted here too (gateway-wide, in Redis when
configured); a deployment at its limit is cooled down until its minute ends, so
the router sends traffic elsewhere instead of to a provider that would answer 429.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from billing import admission
from core.errors import GatewayError
from gateway.routing import Deployment, GroupPolicy, RoutingTable

# deployment id → consecutive failures, and until when (monotonic) it is cooled down.
_failures: dict[str, int] = {}
_cooled_until: dict[str, float] = {}


class NoDeployment(Exception):
    """Every deployment of the model is cooling down or at its rate limit."""


def cooling(deployment_id: str) -> bool:
    until = _cooled_until.get(deployment_id)
    return until is not None and until > time.monotonic()


def _cool(
    table: RoutingTable, group: str, deployment: Deployment, seconds: float, status: int
) -> None:
    _cooled_until[deployment.id] = time.monotonic() + seconds
    router = table.router(group)
    if router is not None:
        router.cooldown_cache.add_deployment_to_cooldown(
            model_id=deployment.id,
            original_exception=Exception(f"gateway circuit breaker ({status})"),
            exception_status=status,
            cooldown_time=seconds,
        )


async def _choose(table: RoutingTable, group: str, body: dict[str, Any]) -> Deployment:
    members = [d for d in table.group(group) if not cooling(d.id)]
    if not members:
        raise NoDeployment(group)
    if len(members) == 1:
        return members[0]
    try:
        chosen = await table.router(group).async_get_available_deployment(
            model=table.resolve(group),
            messages=body.get("messages"),
            input=body.get("input"),
            request_kwargs={},
        )
    except Exception as exc:
        raise NoDeployment(group) from exc
    return table.deployments.get(chosen["model_info"]["id"], members[0])


async def pick(table: RoutingTable, group: str, body: dict[str, Any], tokens: int) -> Deployment:
    """A deployment of `group` that is healthy and under its own rpm/tpm limits."""
    for _ in range(len(table.group(group)) + 1):
        deployment = await _choose(table, group, body)
        if not deployment.rpm_limit and not deployment.tpm_limit:
            return deployment
        try:
            wait = await admission.deployment_take(
                deployment.id, deployment.rpm_limit, deployment.tpm_limit, tokens
            )
        except GatewayError:
            return deployment  # counting unavailable: the provider's own limit still applies
        if wait is None:
            return deployment
        _cool(table, group, deployment, wait, 429)
    raise NoDeployment(group)


def _kwargs(
    table: RoutingTable, group: str, deployment: Deployment, stream: bool
) -> dict[str, Any]:
    return {
        "litellm_params": {
            "metadata": {"model_group": table.resolve(group)},
            "model_info": {"id": deployment.id},
        },
        "stream": stream,
    }


def started(table: RoutingTable, group: str, deployment: Deployment, stream: bool) -> None:
    router = table.router(group)
    busy = getattr(router, "leastbusy_logger", None) if router is not None else None
    if busy is not None:
        busy.log_pre_api_call(
            model=group, messages=None, kwargs=_kwargs(table, group, deployment, stream)
        )


async def succeeded(
    table: RoutingTable,
    group: str,
    deployment: Deployment,
    *,
    stream: bool,
    began: datetime,
    first_byte: datetime | None,
) -> None:
    _failures.pop(deployment.id, None)
    await _report(table, group, deployment, stream, began, first_byte, ok=True)


async def failed(
    table: RoutingTable,
    group: str,
    deployment: Deployment,
    policy: GroupPolicy,
    *,
    status: int,
    retry_after: float | None,
    counts: bool,
    stream: bool,
    began: datetime,
) -> None:
    """Record a failed attempt; `counts` is False for errors that are the client's fault."""
    await _report(table, group, deployment, stream, began, None, ok=False)
    if not counts:
        return
    failures = _failures.get(deployment.id, 0) + 1
    _failures[deployment.id] = failures
    if status == 429 and retry_after:
        _cool(table, group, deployment, min(retry_after, policy.cooldown_seconds * 6), status)
    elif failures >= policy.allowed_fails:
        _failures[deployment.id] = 0
        _cool(table, group, deployment, policy.cooldown_seconds, status)


async def _report(
    table: RoutingTable,
    group: str,
    deployment: Deployment,
    stream: bool,
    began: datetime,
    first_byte: datetime | None,
    *,
    ok: bool,
) -> None:
    router = table.router(group)
    if router is None:
        return
    kwargs = _kwargs(table, group, deployment, stream)
    if first_byte is not None:
        kwargs["completion_start_time"] = first_byte
    ended = datetime.now()
    for name in ("leastbusy_logger", "lowestlatency_logger"):
        handler = getattr(router, name, None)
        if handler is None:
            continue
        if ok:
            await handler.async_log_success_event(kwargs, None, began, ended)
        else:
            await handler.async_log_failure_event(kwargs, None, began, ended)
