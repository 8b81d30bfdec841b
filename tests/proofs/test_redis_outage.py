"""Promise: with Redis hung, budgeted keys fail fast with 503 and unlimited keys keep working.

The documented policy (billing/admission.py): a key with a budget or a rate limit
is refused with 503 `budget_service_unavailable` when Redis does not answer within
GATEWAY_REDIS_TIMEOUT_SECONDS; keys with neither never touch Redis.
"""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.e2e


def test_it_fails_fast_while_redis_is_stopped_and_recovers_without_restart(
    private_redis, spawn_gateway, make_model, make_key
):
    gateway = spawn_gateway(REDIS_URL=private_redis.url, GATEWAY_REDIS_TIMEOUT_SECONDS="0.3")
    model = make_model()
    budgeted = make_key(max_budget_micro_usd=1_000_000)
    unlimited = make_key()
    messages: Any = [{"role": "user", "content": "hi"}]
    budgeted_client = openai.OpenAI(base_url=gateway.v1, api_key=budgeted.secret, max_retries=0)
    unlimited_client = openai.OpenAI(base_url=gateway.v1, api_key=unlimited.secret, max_retries=0)
    budgeted_client.chat.completions.create(model=model.name, messages=messages)

    private_redis.stop()
    try:
        durations = []
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as refused:
                budgeted_client.chat.completions.create(model=model.name, messages=messages)
            durations.append(time.monotonic() - started)
            assert refused.value.status_code == 503
            body: Any = refused.value.body
            assert body["code"] == "budget_service_unavailable"
        # Bounded by the Redis timeouts, not hung.
        assert max(durations) < 2.0, durations
        reply = unlimited_client.chat.completions.create(model=model.name, messages=messages)
        assert reply.choices[0].message.content
    finally:
        private_redis.resume()

    deadline = time.monotonic() + 10
    while True:
        try:
            budgeted_client.chat.completions.create(model=model.name, messages=messages)
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "did not recover after Redis came back"
            time.sleep(0.2)
