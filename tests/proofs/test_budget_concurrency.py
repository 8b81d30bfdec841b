"""Promise: however many requests arrive at once, admitted spend never passes a budget."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.support.money import ledger_spent

pytestmark = pytest.mark.e2e


async def _fire(base_url: str, secret: str, model: str, count: int, max_tokens: int) -> list[int]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=secret, max_retries=0, timeout=60)

    async def one() -> int:
        try:
            await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "spend a little"}],
                max_tokens=max_tokens,
            )
            return 200
        except openai.APIStatusError as exc:
            assert exc.status_code == 429, exc.response.text
            body: Any = exc.body
            assert body["type"] == "insufficient_quota", body
            return 429

    try:
        return list(await asyncio.gather(*(one() for _ in range(count))))
    finally:
        await client.close()


def test_it_never_admits_more_than_the_budget_under_200_concurrent_requests(
    spawn_gateway, make_model, make_key, make_team
):
    # Two worker processes, so atomicity cannot come from one event loop.
    gateway = spawn_gateway(workers=2, server="prefork")
    name = f"budget-{uuid.uuid4().hex[:8]}"
    model = make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens=40",
        input_cost_per_million=Decimal("1"),
        output_cost_per_million=Decimal("2"),
    )
    budget = 6_000  # micro-USD: room for a few dozen requests out of 200
    team = make_team(budget_micro_usd=budget * 10)
    tight = make_key(team=team, max_budget_micro_usd=budget)

    results = asyncio.run(_fire(gateway.v1, tight.secret, model.name, 200, max_tokens=60))

    admitted = results.count(200)
    assert admitted > 10, results  # the budget really was being used
    assert results.count(429) == 200 - admitted
    spent = ledger_spent(key_id=tight.key.id)
    assert 0 < spent <= budget

    # Counters equal the ledger to the micro-dollar, and nothing stays reserved.
    report = httpx.get(
        f"{gateway.url}/api/admin/keys/{tight.key.id}/spend",
        headers={"authorization": f"Bearer {gateway.env['GATEWAY_ADMIN_TOKEN']}"},
    ).json()
    assert report["spent_usd"] == f"{spent / 1_000_000:.6f}"
    assert report["reserved_usd"] == "0.000000"
    import redis

    counters = redis.Redis.from_url(gateway.env["REDIS_URL"])
    key_counter = [k for k in counters.keys(f"gw:bud:k:{tight.key.id}:*")]
    assert len(key_counter) == 1
    state = counters.hgetall(key_counter[0])
    assert int(state[b"spent"]) == spent
    assert int(state[b"reserved"]) == 0
    # No open reservation still points at this key's counter.
    open_reservations: list[bytes] = counters.hvals("gw:res:val")  # type: ignore[assignment]
    counter_name: bytes = key_counter[0]  # type: ignore[assignment]
    assert not [v for v in open_reservations if counter_name in v]


def test_it_gives_no_false_refusals_to_a_key_at_half_its_budget(
    spawn_gateway, make_model, make_key
):
    gateway = spawn_gateway(workers=2, server="prefork")
    name = f"half-{uuid.uuid4().hex[:8]}"
    model = make_model(name=name, provider_model=f"openai/{name};output_tokens=40")
    # 100 requests reserve at most ~ (prompt + 60 * 2) micro-USD each; give twice that.
    roomy = make_key(max_budget_micro_usd=100 * 2 * 200)

    results = asyncio.run(_fire(gateway.v1, roomy.secret, model.name, 100, max_tokens=60))

    assert results == [200] * 100
    assert ledger_spent(key_id=roomy.key.id) <= 100 * 2 * 200
