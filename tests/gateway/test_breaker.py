"""Unit tests of the circuit breaker (gateway/breaker.py): no server, no database.

A deployment is skipped for `cooldown_seconds` after `allowed_fails` failures in a row
that are not the client's fault, or at once for a provider's Retry-After on a 429
(capped at six cooldowns). The clock is the breaker's own `time.monotonic`, frozen here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest

from billing.pricing import Prices
from gateway import breaker
from gateway.routing import Deployment, GroupPolicy, RoutingTable

POLICY = GroupPolicy(allowed_fails=3, cooldown_seconds=10.0)
ZERO = Decimal("0")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(breaker, "time", SimpleNamespace(monotonic=lambda: now.t))
    yield now


def deployment(name: str = "m") -> Deployment:
    return Deployment(
        id=f"dep-{uuid.uuid4().hex[:8]}",
        name=name,
        provider_model=f"openai/{name}",
        provider="openai",
        upstream_model=name,
        api_base="http://127.0.0.1:9/v1",
        api_key="",
        api_version="",
        timeout_seconds=30.0,
        prices=Prices(input=ZERO, output=ZERO, cached_input=ZERO, cache_write=ZERO, reasoning=ZERO),
        context_length=None,
        max_output_tokens=None,
        capabilities={},
        drop_unsupported_params=False,
        mode="chat",
    )


def table_of(*members: Deployment) -> RoutingTable:
    # No litellm Router: with one healthy member the breaker needs none.
    return RoutingTable(
        token="t", deployments={d.id: d for d in members}, groups={"m": list(members)}
    )


def fail(
    table: RoutingTable,
    target: Deployment,
    *,
    status: int = 500,
    retry_after: float | None = None,
    counts: bool = True,
) -> None:
    asyncio.run(
        breaker.failed(
            table,
            "m",
            target,
            POLICY,
            status=status,
            retry_after=retry_after,
            counts=counts,
            stream=False,
            began=datetime.now(),
        )
    )


def succeed(table: RoutingTable, target: Deployment) -> None:
    asyncio.run(
        breaker.succeeded(table, "m", target, stream=False, began=datetime.now(), first_byte=None)
    )


def pick(table: RoutingTable) -> Deployment:
    return asyncio.run(breaker.pick(table, "m", {"messages": []}, tokens=1))


def test_it_opens_after_allowed_fails_failures_in_a_row(clock: SimpleNamespace) -> None:
    only = deployment()
    table = table_of(only)

    fail(table, only)
    fail(table, only)
    assert breaker.cooling(only.id) is False
    assert pick(table) == only

    fail(table, only)
    assert breaker.cooling(only.id) is True
    with pytest.raises(breaker.NoDeployment):
        pick(table)


def test_it_closes_again_when_the_cooldown_has_passed(clock: SimpleNamespace) -> None:
    only = deployment()
    table = table_of(only)
    for _ in range(3):
        fail(table, only)

    clock.t += 9.99
    assert breaker.cooling(only.id) is True
    clock.t += 0.02
    assert breaker.cooling(only.id) is False
    assert pick(table) == only


def test_it_counts_failures_in_a_row_only(clock: SimpleNamespace) -> None:
    only = deployment()
    table = table_of(only)

    fail(table, only)
    fail(table, only)
    succeed(table, only)
    fail(table, only)
    fail(table, only)

    assert breaker.cooling(only.id) is False


def test_it_starts_counting_afresh_after_opening(clock: SimpleNamespace) -> None:
    only = deployment()
    table = table_of(only)
    for _ in range(3):
        fail(table, only)
    clock.t += 11

    fail(table, only)

    assert breaker.cooling(only.id) is False


def test_it_never_opens_for_failures_that_are_the_clients_fault(clock: SimpleNamespace) -> None:
    only = deployment()
    table = table_of(only)

    for _ in range(10):
        fail(table, only, status=400, counts=False)

    assert breaker.cooling(only.id) is False


def test_it_cools_a_rate_limited_deployment_for_the_providers_retry_after_at_once(
    clock: SimpleNamespace,
) -> None:
    only = deployment()
    table = table_of(only)

    fail(table, only, status=429, retry_after=4.0)

    assert breaker.cooling(only.id) is True
    clock.t += 3.99
    assert breaker.cooling(only.id) is True
    clock.t += 0.02
    assert breaker.cooling(only.id) is False


def test_it_caps_a_retry_after_at_six_cooldowns(clock: SimpleNamespace) -> None:
    only = deployment()
    table = table_of(only)

    fail(table, only, status=429, retry_after=3600.0)

    clock.t += 59.99
    assert breaker.cooling(only.id) is True
    clock.t += 0.02
    assert breaker.cooling(only.id) is False


def test_it_picks_the_healthy_member_when_the_other_is_cooling(clock: SimpleNamespace) -> None:
    sick, healthy = deployment(), deployment()
    table = table_of(sick, healthy)
    for _ in range(3):
        fail(table, sick)

    assert [pick(table) for _ in range(5)] == [healthy] * 5
