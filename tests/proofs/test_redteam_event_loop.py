"""Issue #12, item 7: no long CPU work on the event loop; per-stream memory is bounded.

One uvicorn worker serves every request with one event loop. An attacker's 8 MB
prompt must not stall the other requests of that worker while its tokens are
counted, and a client reading a long stream slowly must not make the gateway hold
the whole stream in memory.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import LiveGateway

pytestmark = pytest.mark.e2e

WORDS = ["alpha", "beta", "gamma", "delta", "lorem", "ipsum", "x1", "zz", "token", "budget"]


def _big_prompt(size: int) -> str:
    # Varied words, so the tokenizer does real work (deterministic for repeatability).
    rng = random.Random(12)
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


async def _probe(
    client: httpx.AsyncClient, secret: str, model: str, stop: asyncio.Event
) -> list[float]:
    """Small requests, one after another, until `stop`: their latencies in seconds."""
    latencies: list[float] = []
    small = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    turn = 0
    while not stop.is_set():
        began = time.perf_counter()
        if turn % 2:
            response = await client.get("/health/live")
        else:
            response = await client.post(
                "/v1/chat/completions", json=small, headers={"authorization": f"Bearer {secret}"}
            )
        latencies.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text[:300]
        turn += 1
        await asyncio.sleep(0.01)
    return latencies


def test_it_keeps_serving_small_requests_while_an_8mb_prompt_is_counted(
    live_gateway: LiveGateway, make_model: Any, make_key: Any
) -> None:
    model = make_model()
    secret = make_key().secret
    # Just under the 8 MiB body limit, in two messages (both are counted).
    half = _big_prompt(3_900_000)
    big = orjson.dumps(
        {
            "model": model.name,
            "messages": [{"role": "system", "content": half}, {"role": "user", "content": half}],
            "max_tokens": 5,
        }
    )
    assert 7_000_000 < len(big) < 8 * 1024 * 1024

    async def run() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(base_url=live_gateway.url, timeout=120) as client:
            stop = asyncio.Event()
            # Warm both paths first, so no first-use cost lands inside the measurement.
            warm = asyncio.create_task(_probe(client, secret, model.name, stop))
            await asyncio.sleep(0.3)
            stop.set()
            await warm
            stop.clear()
            probes = asyncio.create_task(_probe(client, secret, model.name, stop))
            await asyncio.sleep(0.2)
            began = time.perf_counter()
            response = await client.post(
                "/v1/chat/completions",
                content=big,
                headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
            )
            elapsed = time.perf_counter() - began
            assert response.status_code == 200, response.text[:300]
            stop.set()
            return elapsed, await probes

    elapsed, latencies = asyncio.run(run())
    assert len(latencies) >= 5, latencies
    worst = max(latencies)
    # Before the fix the count held the loop for most of the big request's time, so
    # the worst small request waited nearly as long as the big one took.
    assert worst < 0.3 * elapsed, (
        f"a small request waited {worst:.3f}s while the 8 MB request took {elapsed:.3f}s "
        f"(latencies: {sorted(latencies)[-5:]})"
    )
