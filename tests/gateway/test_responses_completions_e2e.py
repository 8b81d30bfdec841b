"""OpenAI's Responses API and legacy completions, through the official `openai` SDK.

Both are billed (one ledger row, `x-gateway-cost-usd`) and admitted against budgets
exactly like chat completions. The Responses API also reaches an Anthropic-dialect
deployment, through litellm's translation.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.support.http import openai_sdk
from tests.support.models import anthropic_deployment, openai_deployment
from tests.support.money import cost_micro_usd, ledger, ledger_for_model, upstream_name, usd

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["openai", "anthropic"])
def deployment(request: pytest.FixtureRequest, make_model: Any, mock_upstream: Any) -> Any:
    if request.param == "anthropic":
        return anthropic_deployment(make_model, mock_upstream)
    return openai_deployment(make_model)


def test_it_creates_a_response(
    live_gateway: Any, mock_upstream: Any, make_key: Any, deployment: Any
) -> None:
    client = openai_sdk(live_gateway, make_key().secret)
    before = mock_upstream.calls(upstream_name(deployment))

    raw = client.responses.with_raw_response.create(
        model=deployment.name, input="Say hello to the gateway", instructions="Be brief."
    )
    response = raw.parse()

    assert response.status == "completed", response
    assert response.output_text.startswith("Mock reply to: Say hello to the gateway"), response
    assert response.usage is not None
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert mock_upstream.calls(upstream_name(deployment)) == before + 1
    [row] = ledger(raw.headers["x-request-id"])
    assert (row.endpoint, row.status, row.model) == ("responses", "success", deployment.name)
    assert row.provider_model == deployment.provider_model
    assert (row.prompt_tokens, row.completion_tokens) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )
    expected = cost_micro_usd(
        input_tokens=response.usage.input_tokens,
        output_tokens=response.usage.output_tokens,
        prices=("1.00", "2.00"),
    )
    assert row.charged_cost_micro_usd == expected
    assert usd(raw.headers["x-gateway-cost-usd"]) == expected


def test_it_streams_a_response(live_gateway: Any, make_key: Any, deployment: Any) -> None:
    client = openai_sdk(live_gateway, make_key().secret)

    with client.responses.stream(
        model=deployment.name, input="Stream a story", instructions="Be brief."
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()

    assert kinds[0] == "response.created", kinds
    assert kinds[-1] == "response.completed", kinds
    assert "response.output_text.delta" in kinds, kinds
    assert final.output_text.startswith("Mock reply to: Stream a story"), final
    assert final.usage is not None and final.usage.output_tokens > 0
    [row] = ledger_for_model(deployment.name)
    assert (row.endpoint, row.status) == ("responses", "success")
    assert row.stream
    assert row.provider_model == deployment.provider_model
    assert (row.prompt_tokens, row.completion_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    assert row.charged_cost_micro_usd == cost_micro_usd(
        input_tokens=final.usage.input_tokens,
        output_tokens=final.usage.output_tokens,
        prices=("1.00", "2.00"),
    )


def test_it_serves_legacy_completions(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    deployment = openai_deployment(make_model)
    client = openai_sdk(live_gateway, make_key().secret)

    raw = client.completions.with_raw_response.create(
        model=deployment.name, prompt="Once upon a time", max_tokens=30
    )
    completion = raw.parse()

    assert completion.choices[0].text, completion
    assert completion.usage is not None
    [row] = ledger(raw.headers["x-request-id"])
    assert (row.endpoint, row.status, row.stream) == ("completions", "success", False)
    assert (row.prompt_tokens, row.completion_tokens) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    expected = cost_micro_usd(
        input_tokens=completion.usage.prompt_tokens,
        output_tokens=completion.usage.completion_tokens,
        prices=("1.00", "2.00"),
    )
    assert row.charged_cost_micro_usd == expected > 0
    assert usd(raw.headers["x-gateway-cost-usd"]) == expected

    raw_stream = client.completions.with_raw_response.create(
        model=deployment.name, prompt="Once upon a time", max_tokens=30, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in raw_stream.parse() if chunk.choices)

    # The mock is deterministic: the same prompt gives the same text, streamed or not.
    assert streamed == completion.choices[0].text
    [streamed_row] = ledger(raw_stream.headers["x-request-id"])
    assert (streamed_row.endpoint, streamed_row.status) == ("completions", "success")
    assert streamed_row.stream
    assert streamed_row.completion_tokens == completion.usage.completion_tokens
    assert streamed_row.charged_cost_micro_usd == expected
    assert mock_upstream.calls(upstream_name(deployment)) == 2


def test_it_admits_responses_and_completions_against_the_key_budget(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    # Free prompts and a fixed 10-token answer at 1 micro-USD per token: each request costs
    # exactly 10, and admission reserves max_output_tokens (16) micro-USD for it.
    deployment = openai_deployment(
        make_model,
        controls=";output_tokens=10",
        input_cost_per_million=Decimal("0"),
        output_cost_per_million=Decimal("1"),
    )
    alice = make_key(max_budget_micro_usd=25)
    client = openai_sdk(live_gateway, alice.secret)

    raw = client.responses.with_raw_response.create(
        model=deployment.name, input="Hi", max_output_tokens=16
    )
    assert usd(raw.headers["x-gateway-cost-usd"]) == 10
    # 10 spent + 16 reserved would pass 25: refused before any provider call.
    calls = mock_upstream.calls(upstream_name(deployment))
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model=deployment.name, input="Hi", max_output_tokens=16)
    assert refused.value.status_code == 429
    assert isinstance(refused.value.body, dict), refused.value.body
    assert refused.value.body["type"] == "insufficient_quota", refused.value.body
    with pytest.raises(openai.RateLimitError) as refused_legacy:
        client.completions.create(model=deployment.name, prompt="Hi", max_tokens=16)
    assert isinstance(refused_legacy.value.body, dict)
    assert refused_legacy.value.body["type"] == "insufficient_quota", refused_legacy.value.body
    assert mock_upstream.calls(upstream_name(deployment)) == calls

    # The same budget admits a legacy completion that fits: 10 spent + 15 reserved = 25.
    bob = openai_sdk(live_gateway, make_key(max_budget_micro_usd=25).secret)
    first = bob.completions.with_raw_response.create(
        model=deployment.name, prompt="Hi", max_tokens=15
    )
    assert usd(first.headers["x-gateway-cost-usd"]) == 10
    with pytest.raises(openai.RateLimitError):
        bob.completions.create(model=deployment.name, prompt="Hi", max_tokens=16)
    [row] = ledger(first.headers["x-request-id"])
    assert (row.endpoint, row.charged_cost_micro_usd) == ("completions", 10)


def test_it_refuses_an_outsider_on_responses_and_completions(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    mine = openai_deployment(make_model)
    other = openai_deployment(make_model)
    charlie = openai_sdk(live_gateway, make_key(allowed_models=[other.name]).secret)

    with pytest.raises(openai.PermissionDeniedError) as refused:
        charlie.responses.create(model=mine.name, input="Hi")
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "model_not_allowed", refused.value.body
    with pytest.raises(openai.PermissionDeniedError):
        charlie.completions.create(model=mine.name, prompt="Hi", max_tokens=16)
    assert mock_upstream.calls(upstream_name(mine)) == 0
    assert ledger_for_model(mine.name) == []
