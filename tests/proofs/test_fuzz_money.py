"""Fuzzing the money path (issue #12): whatever mix of multipliers, fallbacks and cache
hits a client sends, a key never spends past its budget and the budget counter in Redis
equals the ledger once everything has settled.

Hypothesis sends chat and legacy completions, JSON and streamed, with `n` up to 128
with and without `max_tokens`, `best_of`, lists of prompts, prompts too long for the
cheap model (so the request falls back to a model 50 times pricier), and repeated
prompts through the response cache, whose hits are billed (GATEWAY_CACHE_BILL_HITS).
The upstream is the mock, which writes exactly 400 tokens per answer unless capped
lower. The default run is bounded and derandomized; `make soak` runs many more.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.proofs.conftest import SOAK
from tests.proofs.test_fuzz import fuzz_settings
from tests.support.http import openai_error_shape
from tests.support.money import budget_counter, ledger_cache_hits, ledger_spent

pytestmark = pytest.mark.e2e

EXAMPLES = 400 if SOAK else 40
PER_ANSWER = 400
BUDGET = 150_000  # micro-USD
SHORT = ["hi", "spend", "again", "once more"]
# Longer than the cheap model's 40-token context: served by its pricier fallback.
LONG = [" ".join(["a long prompt that must fall back"] * 12) + f" {i}" for i in range(3)]


@st.composite
def requests(draw: Any) -> tuple[str, dict[str, Any], bool]:
    """(path, body, cache on)."""
    prompt = draw(st.sampled_from(SHORT + LONG))
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["n"] = draw(st.sampled_from([1, 2, 3, 8, 128]) | st.integers(1, 128))
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(1, 2 * PER_ANSWER))
    stream = draw(st.booleans())
    if stream:
        body["stream"] = True
    if draw(st.booleans()):
        path = "completions"
        body["prompt"] = draw(st.sampled_from([prompt, [prompt, prompt], [prompt] * 4]))
        if "n" in body:
            body["n"] = min(body["n"], 20)  # OpenAI: n x prompts at most 128
        if not stream and draw(st.booleans()):
            # best_of candidates are generated and billed; OpenAI requires best_of >= n.
            body["best_of"] = max(int(body.get("n", 1)), draw(st.integers(1, 20)))
    else:
        path = "chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    return path, body, draw(st.booleans())


def test_it_never_spends_past_the_budget_whatever_the_multipliers(
    spawn_gateway: Any,
    services_env: dict[str, str],
    make_model: Any,
    make_key: Any,
) -> None:
    from gateway import services

    gateway = spawn_gateway(GATEWAY_CACHE_BILL_HITS="true")
    tag = uuid.uuid4().hex[:8]
    pricey_name, cheap_name = f"pricey-{tag}", f"cheap-{tag}"
    make_model(
        name=pricey_name,
        provider_model=f"openai/{pricey_name};output_tokens={PER_ANSWER}",
        input_cost_per_million=Decimal("50"),
        output_cost_per_million=Decimal("100"),
        max_output_tokens=PER_ANSWER,
    )
    make_model(
        name=cheap_name,
        provider_model=f"openai/{cheap_name};output_tokens={PER_ANSWER}",
        input_cost_per_million=Decimal("1"),
        output_cost_per_million=Decimal("2"),
        max_output_tokens=PER_ANSWER,
        context_length=40,
    )
    services.group_save(name=cheap_name, context_window_fallbacks=[pricey_name], num_retries=0)
    key = make_key(max_budget_micro_usd=BUDGET)
    client = httpx.Client(
        base_url=gateway.v1, headers={"authorization": f"Bearer {key.secret}"}, timeout=60
    )
    seen: dict[str, int] = {}

    def once(path: str, body: dict[str, Any], cache: bool) -> None:
        headers = {"x-gateway-cache": "on" if cache else "off"}
        with client.stream("POST", path, json=body, headers=headers) as response:
            raw = response.read()
        status = response.status_code
        seen[str(status)] = seen.get(str(status), 0) + 1
        assert status in (200, 400, 429), (status, raw[:300], body)
        if status != 200:
            assert openai_error_shape(httpx.Response(status, content=raw).json()), raw[:300]
        elif body.get("stream"):
            assert raw.rstrip().endswith(b"data: [DONE]"), raw[-300:]
        spent, _ = (ledger_spent(key_id=key.key.id), ledger_cache_hits(key_id=key.key.id))
        assert spent <= BUDGET, (spent, body)

    @fuzz_settings(EXAMPLES)
    @given(request=requests())
    def send(request: tuple[str, dict[str, Any], bool]) -> None:
        path, body, cache = request
        body = {**body, "model": cheap_name}
        once(path, body, cache)
        if cache:
            once(path, body, cache)  # a hit, when the first was served and cached

    try:
        send()
    finally:
        client.close()

    spent, hits = (ledger_spent(key_id=key.key.id), ledger_cache_hits(key_id=key.key.id))
    assert spent <= BUDGET
    deadline = time.monotonic() + 10
    while budget_counter(services_env["REDIS_URL"], key.key.id, required=False) != (spent, 0):
        assert time.monotonic() < deadline, (
            budget_counter(services_env["REDIS_URL"], key.key.id, required=False),
            spent,
        )
        time.sleep(0.05)
    # The run exercised what it is about: served, refused and cached answers.
    assert seen.get("200") and seen.get("429"), seen
    assert hits > 0, seen
