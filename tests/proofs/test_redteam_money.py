"""Red team (issue #12, money): every multiplier, every reachable model and every cache
hit goes through the reservation, so what a key spends never passes its budget and the
Redis counters always equal the ledger.

Each test drives the live gateway (real Postgres and Redis) with the official SDKs or raw
httpx, against the project's mock upstream, and attacks one way a request could spend
more than was reserved: `n` without `max_tokens`, a fallback to a pricier model the
reservation never priced, a Responses call whose cost we would never see, a
`previous_response_id` carrying a context we never counted, and cached answers that
used to skip admission altogether.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.http import anthropic_error_shape, openai_error_shape, unique
from tests.support.money import ledger_for_key, ledger_spent, wait_budget_settled

pytestmark = pytest.mark.e2e


# --- helpers -------------------------------------------------------------------------------


def _post(gateway: Any, secret: str, path: str, body: dict[str, Any], **headers: str) -> Any:
    return httpx.post(
        f"{gateway.v1}/{path}",
        json=body,
        headers={"authorization": f"Bearer {secret}", **headers},
        timeout=60,
    )


def _refused_budget(response: Any) -> bool:
    body = response.json()
    return response.status_code == 429 and body["error"]["type"] == "insufficient_quota"


# --- item 1: n and every multiplier count ------------------------------------------------------

# $10 per 1M output tokens; 2,000 output tokens per choice (the mock's `output_tokens`).
PER_CHOICE = 2_000
OUTPUT_PRICE = Decimal("10")


def _wordy_model(make_model: Any, **fields: Any) -> Any:
    name = unique("wordy")
    return make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens={PER_CHOICE}",
        input_cost_per_million=Decimal("1"),
        output_cost_per_million=OUTPUT_PRICE,
        max_output_tokens=PER_CHOICE,
        **fields,
    )


def test_it_reserves_every_choice_of_n_without_max_tokens(
    live_gateway: Any, services_env: dict[str, str], make_model: Any, make_key: Any
) -> None:
    """n=128 and no max_tokens: 128 x 2,000 tokens at $10/M would be $2.56 on a $0.10 budget."""
    model = _wordy_model(make_model)
    budget = 100_000
    key = make_key(max_budget_micro_usd=budget)
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=key.secret, max_retries=0)

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "many"}], n=128
        )
    assert refused.value.body["type"] == "insufficient_quota"  # type: ignore[index]

    # The same call streamed, and with best-of-style multipliers on legacy completions.
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "many"}], n=128, stream=True
        )
    with pytest.raises(openai.RateLimitError):
        # best_of=20 candidates are billed though n=4 are returned.
        client.completions.create(
            model=model.name, prompt="many", n=4, best_of=20, max_tokens=PER_CHOICE // 4
        )
    with pytest.raises(openai.RateLimitError):
        # A list of prompts is a multiplier too: one completion per prompt.
        client.completions.create(model=model.name, prompt=["a"] * 20, max_tokens=PER_CHOICE)

    # Two choices fit: 2 x 2,000 x $10/M = 40,000 micro-USD; the provider's usage is billed.
    answer = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "two"}], n=2
    )
    assert len(answer.choices) == 2
    assert answer.usage is not None and answer.usage.completion_tokens == 2 * PER_CHOICE
    assert ledger_spent(key_id=key.key.id) <= budget
    assert wait_budget_settled(services_env["REDIS_URL"], key.key.id) == (
        ledger_spent(key_id=key.key.id),
        0,
    )


def test_it_counts_every_choice_in_the_tokens_per_minute_limit(
    live_gateway: Any, make_model: Any, make_key: Any
) -> None:
    model = _wordy_model(make_model)
    # One choice (2,000 output tokens + the prompt) fits 10,000 tokens a minute; ten do not.
    key = make_key(tpm_limit=10_000)
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=key.secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "ten"}], n=10
        )
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert "token" in refused.value.body["message"].lower()  # type: ignore[index]
    answer = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "one"}]
    )
    assert answer.usage is not None and answer.usage.completion_tokens == PER_CHOICE


# --- item 3: reserve what the request may actually do --------------------------------------


def test_it_prices_a_context_window_fallback_to_a_pricier_model(
    live_gateway: Any, services_env: dict[str, str], make_model: Any, make_key: Any
) -> None:
    """A cheap model whose context is too small falls back to one 100x pricier.

    The reservation must be at the pricier model's prices (and its larger max output),
    or a budget that covers the cheap model pays for the expensive one.
    """
    from gateway import services

    big_name = unique("big")
    big = make_model(
        name=big_name,
        provider_model=f"openai/{big_name};output_tokens=1000",
        input_cost_per_million=Decimal("100"),
        output_cost_per_million=Decimal("100"),
        max_output_tokens=1000,
    )
    # And the big model's own content-policy fallback is pricier still: reachable too.
    huge_name = unique("huge")
    make_model(
        name=huge_name,
        provider_model=f"openai/{huge_name};output_tokens=1000",
        input_cost_per_million=Decimal("1000"),
        output_cost_per_million=Decimal("1000"),
        max_output_tokens=1000,
    )
    services.group_save(name=big.name, content_policy_fallbacks=[huge_name])
    small = make_model(
        name=unique("small"),
        input_cost_per_million=Decimal("1"),
        output_cost_per_million=Decimal("1"),
        context_length=5,
        max_output_tokens=100,
    )
    services.group_save(name=small.name, context_window_fallbacks=[big.name])
    # Covers the small model (and the big one), but not the huge one it may reach.
    budget = 200_000
    key = make_key(max_budget_micro_usd=budget)
    body = {
        "model": small.name,
        "messages": [{"role": "user", "content": "a prompt longer than five tokens, surely"}],
    }
    refused = _post(live_gateway, key.secret, "chat/completions", body)
    assert _refused_budget(refused), refused.text
    assert ledger_spent(key_id=key.key.id) == 0

    # Once the pricier chain is affordable, it is served by the fallback and billed there.
    roomy = make_key(max_budget_micro_usd=5_000_000)
    served = _post(live_gateway, roomy.secret, "chat/completions", body)
    assert served.status_code == 200, served.text
    assert served.headers["x-gateway-model"].startswith(f"openai/{big_name}")
    assert 100_000 <= ledger_spent(key_id=roomy.key.id) <= 5_000_000
    assert wait_budget_settled(services_env["REDIS_URL"], roomy.key.id) == (
        ledger_spent(key_id=roomy.key.id),
        0,
    )


def test_it_prices_a_content_policy_fallback_the_provider_forces(
    live_gateway: Any, services_env: dict[str, str], make_model: Any, make_key: Any
) -> None:
    """The cheap model's provider refuses on content policy (OpenAI's 400) at run time;
    the request moves to a 100x pricier model that was never in the priced chain."""
    from gateway import services

    big_name = unique("strict-big")
    big = make_model(
        name=big_name,
        provider_model=f"openai/{big_name};output_tokens=1000",
        input_cost_per_million=Decimal("100"),
        output_cost_per_million=Decimal("100"),
        max_output_tokens=1000,
    )
    small_name = unique("prudish")
    small = make_model(
        name=small_name,
        provider_model=f"openai/{small_name};status=400;error_code=content_policy_violation",
        input_cost_per_million=Decimal("1"),
        output_cost_per_million=Decimal("1"),
        max_output_tokens=1000,
    )
    services.group_save(name=small.name, content_policy_fallbacks=[big.name])
    budget = 50_000  # the small model's 1,000 tokens fit; the big one's 100,000 do not
    key = make_key(max_budget_micro_usd=budget)
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=key.secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model=small.name, messages=[{"role": "user", "content": "something edgy"}]
        )
    assert refused.value.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert ledger_spent(key_id=key.key.id) == 0

    roomy = make_key(max_budget_micro_usd=1_000_000)
    roomy_client = openai.OpenAI(base_url=live_gateway.v1, api_key=roomy.secret, max_retries=0)
    served = roomy_client.chat.completions.with_raw_response.create(
        model=small.name, messages=[{"role": "user", "content": "something edgy"}]
    )
    assert served.headers["x-gateway-model"].startswith(f"openai/{big_name}")
    assert served.headers["x-gateway-attempts"] == "2"
    assert 100_000 <= ledger_spent(key_id=roomy.key.id) <= 1_000_000
    assert wait_budget_settled(services_env["REDIS_URL"], roomy.key.id) == (
        ledger_spent(key_id=roomy.key.id),
        0,
    )


def test_it_refuses_a_background_response(
    live_gateway: Any, make_model: Any, make_key: Any
) -> None:
    model = make_model()
    key = make_key(max_budget_micro_usd=1_000_000)
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=key.secret, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model.name, input="later", background=True)
    assert refused.value.body["param"] == "background"  # type: ignore[index]
    assert "background" in refused.value.body["message"]  # type: ignore[index]
    assert ledger_for_key(key.key.id) == []
    # `background: false` is the default and fine.
    answer = client.responses.create(model=model.name, input="now", background=False)
    assert answer.status == "completed"


def test_it_refuses_a_conversation(live_gateway: Any, make_model: Any, make_key: Any) -> None:
    model = make_model()
    key = make_key()
    for conversation in ("conv_123", {"id": "conv_123"}):
        refused = _post(
            live_gateway,
            key.secret,
            "responses",
            {"model": model.name, "input": "hi", "conversation": conversation},
        )
        assert refused.status_code == 400, refused.text
        assert openai_error_shape(refused.json())
        assert refused.json()["error"]["param"] == "conversation"
    assert ledger_for_key(key.key.id) == []


def test_it_scopes_previous_response_id_to_the_team_and_counts_its_context(
    live_gateway: Any, make_model: Any, make_key: Any, make_team: Any
) -> None:
    # Long answers: each turn carries 3,000 output tokens of context into the next.
    name = unique("chatty")
    model = make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens=3000",
        input_cost_per_million=Decimal("10"),
        output_cost_per_million=Decimal("10"),
    )
    team = make_team()
    alice = make_key(team=team)
    bob = make_key(team=team)
    charlie = make_key()  # another team
    alice_client = openai.OpenAI(base_url=live_gateway.v1, api_key=alice.secret, max_retries=0)

    first = alice_client.responses.create(model=model.name, input="start", max_output_tokens=3000)
    # A streamed answer's id is remembered too (from its response.completed event).
    with alice_client.responses.stream(
        model=model.name, input="start streamed", max_output_tokens=3000
    ) as stream:
        streamed = stream.get_final_response()

    for earlier in (first, streamed):
        # Another team's key cannot continue it, nor learn it exists: a 404.
        outsider = _post(
            live_gateway,
            charlie.secret,
            "responses",
            {"model": model.name, "input": "steal", "previous_response_id": earlier.id},
        )
        assert outsider.status_code == 404, outsider.text
        assert outsider.json()["error"]["param"] == "previous_response_id"

    # An id the gateway never issued is a 404 too (a client cannot smuggle context in).
    unknown = _post(
        live_gateway,
        alice.secret,
        "responses",
        {"model": model.name, "input": "x", "previous_response_id": "resp_not_ours"},
    )
    assert unknown.status_code == 404, unknown.text
    assert openai_error_shape(unknown.json())

    # A teammate may continue it; its context (input + output of the earlier turn, over
    # 3,000 tokens) is reserved and counted: a budget for the new prompt alone is refused.

    from accounts import services as account_services

    # 30,000 micro-USD is 3,000 tokens at $10/M.
    account_services.key_update(key=bob.key, max_budget_micro_usd=30_000)
    time.sleep(0.3)  # the gateway's key cache
    squeezed = _post(
        live_gateway,
        bob.secret,
        "responses",
        {
            "model": model.name,
            "input": "go on",
            "max_output_tokens": 16,
            "previous_response_id": first.id,
        },
    )
    assert _refused_budget(squeezed), squeezed.text
    # And a tokens-per-minute limit counts it.
    tight_tpm = make_key(team=team, tpm_limit=2_000)
    limited = _post(
        live_gateway,
        tight_tpm.secret,
        "responses",
        {
            "model": model.name,
            "input": "go on",
            "max_output_tokens": 16,
            "previous_response_id": first.id,
        },
    )
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"

    account_services.key_update(key=bob.key, max_budget_micro_usd=10_000_000)
    time.sleep(0.3)
    continued = _post(
        live_gateway,
        bob.secret,
        "responses",
        {"model": model.name, "input": "go on", "previous_response_id": first.id},
    )
    assert continued.status_code == 200, continued.text


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("chat/completions", {"service_tier": "priority"}, "service_tier"),
        ("chat/completions", {"service_tier": "flex"}, "service_tier"),
        ("chat/completions", {"service_tier": "a-future-tier"}, "service_tier"),
        ("chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ("responses", {"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ("responses", {"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
        (
            "responses",
            {
                "tools": [
                    {"type": "function", "name": "f", "parameters": {"type": "object"}},
                    {"type": "file_search", "vector_store_ids": ["vs_1"]},
                ]
            },
            "tools[1].type",
        ),
        ("responses", {"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ("responses", {"tools": [{"type": "image_generation"}]}, "tools[0].type"),
        ("responses", {"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type"),
        ("responses", {"service_tier": "scale"}, "service_tier"),
        (
            "messages",
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools.0.type",
        ),
        (
            "messages",
            {"tools": [{"type": "code_execution_20250522", "name": "code_execution"}]},
            "tools.0.type",
        ),
        ("messages", {"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, None),
        ("messages", {"container": "container_1"}, "container"),
    ],
)
def test_it_refuses_what_the_ledger_cannot_price(
    live_gateway: Any,
    make_model: Any,
    make_key: Any,
    path: str,
    extra: dict[str, Any],
    param: str | None,
) -> None:
    model = make_model()
    key = make_key()
    if path == "chat/completions":
        body = {"model": model.name, "messages": [{"role": "user", "content": "hi"}], **extra}
    elif path == "responses":
        body = {"model": model.name, "input": "hi", **extra}
    else:
        body = {
            "model": model.name,
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
            **extra,
        }
    refused = _post(live_gateway, key.secret, path, body)
    assert refused.status_code == 400, refused.text
    if path == "messages":
        assert anthropic_error_shape(refused.json())
        message = refused.json()["error"]["message"]
        expected = param or "mcp_servers"
        assert expected in message, message
    else:
        assert openai_error_shape(refused.json())
        assert refused.json()["error"]["param"] == param
        assert refused.json()["error"]["code"] == "unpriced_feature"
    assert ledger_for_key(key.key.id) == []


def test_it_still_serves_function_tools_and_default_service_tiers(
    live_gateway: Any, make_model: Any, make_key: Any
) -> None:
    model = make_model()
    key = make_key()
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=key.secret, max_retries=0)
    answer = client.responses.create(
        model=model.name,
        input="call it",
        service_tier="auto",
        tools=[
            {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}
        ],
    )
    assert answer.status == "completed"
    chat = client.chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "hi"}],
        service_tier="default",
        modalities=["text"],
    )
    assert chat.choices[0].message.content
    claude = anthropic.Anthropic(base_url=live_gateway.url, api_key=key.secret, max_retries=0)
    message = claude.messages.create(
        model=model.name,
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}],
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
    )
    assert message.content


# --- item 4: cached answers go through admission --------------------------------------------

CACHE_ON = {"x-gateway-cache": "on"}


@pytest.fixture
def billing_gateway(spawn_gateway: Any) -> Any:
    return spawn_gateway(GATEWAY_CACHE_BILL_HITS="true")


def test_it_counts_cache_hits_against_the_request_rate_limit(
    live_gateway: Any, make_model: Any, make_key: Any
) -> None:
    model = make_model()
    key = make_key(rpm_limit=3)
    body = {"model": model.name, "messages": [{"role": "user", "content": unique("same")}]}
    statuses = [
        _post(live_gateway, key.secret, "chat/completions", body, **CACHE_ON) for _ in "1234"
    ]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200], statuses[-1].text
    assert [r.headers.get("x-gateway-cache") for r in statuses[:3]] == ["miss", "hit", "hit"]
    assert statuses[3].status_code == 429, statuses[3].text
    assert statuses[3].json()["error"]["code"] == "rate_limit_exceeded"


def test_it_counts_cache_hits_against_the_token_rate_limit(
    live_gateway: Any, make_model: Any, make_key: Any
) -> None:
    name = unique("tpm")
    model = make_model(name=name, provider_model=f"openai/{name};output_tokens=400")
    key = make_key(tpm_limit=1_500)
    body = {
        "model": model.name,
        "max_tokens": 400,
        "messages": [{"role": "user", "content": unique("same")}],
    }
    first = _post(live_gateway, key.secret, "chat/completions", body, **CACHE_ON)
    assert first.status_code == 200, first.text
    outcomes = [
        _post(live_gateway, key.secret, "chat/completions", body, **CACHE_ON) for _ in "12345"
    ]
    # The miss counted ~420 reserved tokens; each hit its exact ~420: the limit bites.
    assert any(r.status_code == 429 for r in outcomes), [r.status_code for r in outcomes]


def test_it_bills_cache_hits_through_the_reservation(
    billing_gateway: Any, services_env: dict[str, str], make_model: Any, make_key: Any
) -> None:
    name = unique("billed")
    model = make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens=500",
        input_cost_per_million=Decimal("10"),
        output_cost_per_million=Decimal("20"),
    )
    # One answer costs about 500 x 20 + 20 x 10 = ~10,200 micro-USD; the budget covers five.
    budget = 55_000
    key = make_key(max_budget_micro_usd=budget)
    body = {
        "model": model.name,
        "max_tokens": 500,
        "messages": [{"role": "user", "content": unique("same")}],
    }
    outcomes = []
    for _ in range(12):
        outcomes.append(_post(billing_gateway, key.secret, "chat/completions", body, **CACHE_ON))
    served = [r for r in outcomes if r.status_code == 200]
    refused = [r for r in outcomes if r.status_code != 200]
    assert served[0].headers["x-gateway-cache"] == "miss"
    assert all(r.headers["x-gateway-cache"] == "hit" for r in served[1:])
    assert refused, [r.status_code for r in outcomes]
    assert all(_refused_budget(r) for r in refused), refused[0].text
    hits = [row for row in ledger_for_key(key.key.id) if row.cache_hit]
    assert hits and all(row.charged_cost_micro_usd > 0 for row in hits)
    assert ledger_spent(key_id=key.key.id) <= budget
    # The counter Redis keeps equals the ledger, to the micro-dollar.
    assert wait_budget_settled(services_env["REDIS_URL"], key.key.id) == (
        ledger_spent(key_id=key.key.id),
        0,
    )
    # A refused hit has no ledger row and did not count.
    assert len(ledger_for_key(key.key.id)) == len(served)


def test_it_bills_a_streamed_cache_hit_like_a_json_one(
    billing_gateway: Any, services_env: dict[str, str], make_model: Any, make_key: Any
) -> None:
    model = make_model()
    key = make_key(max_budget_micro_usd=10_000_000)
    client = openai.OpenAI(base_url=billing_gateway.v1, api_key=key.secret, max_retries=0)
    text = unique("stream me")
    for _ in range(3):
        stream = client.chat.completions.create(
            model=model.name,
            messages=[{"role": "user", "content": text}],
            stream=True,
            extra_headers=CACHE_ON,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    rows = ledger_for_key(key.key.id)
    assert [r.cache_hit for r in rows] == [False, True, True]
    assert all(r.charged_cost_micro_usd > 0 for r in rows)
    assert wait_budget_settled(services_env["REDIS_URL"], key.key.id) == (
        ledger_spent(key_id=key.key.id),
        0,
    )
