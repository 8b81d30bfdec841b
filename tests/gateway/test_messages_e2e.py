"""Anthropic's Messages API on /v1/messages, through the official `anthropic` SDK.

Every behaviour runs against both kinds of deployment: an OpenAI-dialect one (litellm
translates Messages to chat completions and back) and an Anthropic-dialect one (the
gateway forwards the bytes).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, MessageParam, TextBlock, ToolParam, ToolUseBlock

from tests.support.http import anthropic_sdk, unique
from tests.support.models import anthropic_deployment, openai_deployment
from tests.support.money import cost_micro_usd, ledger, upstream_name, usd

pytestmark = pytest.mark.e2e

DIALECTS = ["openai", "anthropic"]
WEATHER_TOOL: ToolParam = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(params=DIALECTS)
def deployment(request: pytest.FixtureRequest, make_model: Any, mock_upstream: Any) -> Any:
    if request.param == "anthropic":
        return anthropic_deployment(make_model, mock_upstream)
    return openai_deployment(make_model)


def text_of(message: Message) -> str:
    texts = [block.text for block in message.content if isinstance(block, TextBlock)]
    assert texts, message
    return "".join(texts)


def tokens(text: str) -> int:
    """The mock upstream's tokenizer: a quarter of the UTF-8 bytes, rounded up."""
    return math.ceil(len(text.encode()) / 4)


def test_it_creates_a_message_with_a_system_prompt_and_turns(
    live_gateway: Any, mock_upstream: Any, make_key: Any, deployment: Any
) -> None:
    issued = make_key()
    client = anthropic_sdk(live_gateway, issued.secret)
    before = mock_upstream.calls(upstream_name(deployment))

    raw = client.messages.with_raw_response.create(
        model=deployment.name,
        max_tokens=200,
        system="You answer in one short sentence.",
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    message = raw.parse()

    assert message.type == "message"
    assert message.role == "assistant"
    # The mock answers the last user turn, whichever dialect carried it.
    assert text_of(message).startswith("Mock reply to: What is my name?"), message
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert mock_upstream.calls(upstream_name(deployment)) == before + 1

    request_id = raw.headers["x-request-id"]
    [row] = ledger(request_id)
    assert row.endpoint == "messages"
    assert row.model == deployment.name
    assert row.provider_model == deployment.provider_model
    assert row.status == "success"
    assert not row.stream
    assert (row.prompt_tokens, row.completion_tokens) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    expected = cost_micro_usd(
        input_tokens=message.usage.input_tokens,
        output_tokens=message.usage.output_tokens,
        prices=("1.00", "2.00"),
    )
    assert row.charged_cost_micro_usd == expected
    assert usd(raw.headers["x-gateway-cost-usd"]) == expected
    assert raw.headers["x-gateway-model"] == deployment.provider_model


def test_it_streams_a_message_in_anthropic_event_order(
    live_gateway: Any, mock_upstream: Any, make_key: Any, deployment: Any
) -> None:
    issued = make_key()
    client = anthropic_sdk(live_gateway, issued.secret)

    with client.messages.stream(
        model=deployment.name,
        max_tokens=200,
        system="Be brief.",
        messages=[{"role": "user", "content": "Tell me about streams"}],
    ) as stream:
        request_id = stream.response.headers["x-request-id"]
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        kinds = [event.type for event in stream]
        final = stream.get_final_message()

    wire: list[str] = [
        k for k in kinds if k not in ("text", "input_json", "citation", "thinking", "signature")
    ]
    assert wire[0] == "message_start", kinds
    assert wire[-1] == "message_stop", kinds
    order = [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    firsts = [wire.index(kind) for kind in order]
    assert firsts == sorted(firsts), wire
    assert wire.count("message_start") == wire.count("message_stop") == 1, wire
    assert text_of(final).startswith("Mock reply to: Tell me about streams"), final
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0

    [row] = ledger(request_id)
    assert row.endpoint == "messages"
    assert row.stream
    assert row.status == "success"
    assert row.provider_model == deployment.provider_model
    assert row.completion_tokens == final.usage.output_tokens
    assert row.prompt_tokens > 0
    assert row.charged_cost_micro_usd == cost_micro_usd(
        input_tokens=row.prompt_tokens,
        output_tokens=row.completion_tokens,
        prices=("1.00", "2.00"),
    )


def test_it_calls_a_tool_and_takes_its_result(
    live_gateway: Any, make_key: Any, deployment: Any
) -> None:
    issued = make_key()
    client = anthropic_sdk(live_gateway, issued.secret)
    question: MessageParam = {"role": "user", "content": "What is the weather in Paris?"}

    raw = client.messages.with_raw_response.create(
        model=deployment.name,
        max_tokens=200,
        tools=[WEATHER_TOOL],
        messages=[question],
    )
    first = raw.parse()
    assert first.stop_reason == "tool_use", first
    calls = [block for block in first.content if isinstance(block, ToolUseBlock)]
    assert len(calls) == 1, first
    call = calls[0]
    assert call.name == "get_weather"
    assert call.input == {"city": "mock"}
    assert call.id

    raw_second = client.messages.with_raw_response.create(
        model=deployment.name,
        max_tokens=200,
        tools=[WEATHER_TOOL],
        messages=[
            question,
            # The assistant's turn goes back as it came: its tool_use block included.
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}
                ],
            },
        ],
    )
    second = raw_second.parse()
    assert second.stop_reason == "end_turn", second
    assert not [b for b in second.content if isinstance(b, ToolUseBlock)], second
    assert text_of(second)

    for response in (raw, raw_second):
        rows = ledger(response.headers["x-request-id"])
        assert [(r.endpoint, r.status) for r in rows] == [("messages", "success")]
        assert rows[0].charged_cost_micro_usd > 0


def test_it_accepts_sampling_parameters_and_records_the_end_user(
    live_gateway: Any, make_key: Any, deployment: Any
) -> None:
    issued = make_key()
    client = anthropic_sdk(live_gateway, issued.secret)
    user_id = unique("end-user")

    raw = client.messages.with_raw_response.create(
        model=deployment.name,
        max_tokens=200,
        messages=[{"role": "user", "content": "Count to ten"}],
        stop_sequences=["never-in-the-reply"],
        metadata={"user_id": user_id},
        # Sampling knobs newer SDKs no longer type; the API (and this gateway) takes them.
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},
    )
    message = raw.parse()

    assert text_of(message).startswith("Mock reply to: Count to ten"), message
    [row] = ledger(raw.headers["x-request-id"])
    assert row.end_user == user_id
    assert row.status == "success"
    assert row.endpoint == "messages"


def test_it_stops_at_the_stop_sequence(live_gateway: Any, make_key: Any, deployment: Any) -> None:
    client = anthropic_sdk(live_gateway, make_key().secret)

    message = client.messages.create(
        model=deployment.name,
        max_tokens=200,
        messages=[{"role": "user", "content": "Count to ten"}],
        # The mock's reply starts "Mock reply to: …": generation must end before "reply".
        stop_sequences=["reply"],
    )

    text = text_of(message)
    assert text.startswith("Mock") and "reply" not in text, text
    if deployment.provider_model.startswith("anthropic/"):
        assert message.stop_reason == "stop_sequence", message
        assert message.stop_sequence == "reply"
    else:
        # An OpenAI-dialect provider reports a stop sequence as a plain "stop", the
        # same as a natural end, so the translated answer can only say end_turn.
        assert message.stop_reason == "end_turn", message


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, (response.status_code, response.text[:1000])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"type", "error"}, body
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert response.headers.get("x-request-id")
    return str(body["error"]["message"])


def test_it_requires_max_tokens_in_anthropic_error_shape(
    live_gateway: Any, mock_upstream: Any, make_key: Any, deployment: Any
) -> None:
    issued = make_key()
    before = mock_upstream.calls(upstream_name(deployment))

    response = httpx.post(
        f"{live_gateway.v1}/messages",
        json={"model": deployment.name, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"x-api-key": issued.secret, "anthropic-version": "2023-06-01"},
        timeout=30,
    )

    message = anthropic_error(response, 400, "invalid_request_error")
    assert "max_tokens" in message
    assert mock_upstream.calls(upstream_name(deployment)) == before
    assert ledger(response.headers["x-request-id"]) == []


def test_it_refuses_a_bad_key_in_anthropic_error_shape(
    live_gateway: Any, mock_upstream: Any, make_model: Any
) -> None:
    deployment = anthropic_deployment(make_model, mock_upstream)
    client = anthropic_sdk(live_gateway, "sk-gw-" + "x" * 40)

    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(
            model=deployment.name, max_tokens=10, messages=[{"role": "user", "content": "Hi"}]
        )

    assert caught.value.status_code == 401
    body = caught.value.body
    assert isinstance(body, dict) and body.get("type") == "error", body
    assert body["error"]["type"] == "authentication_error", body
    assert mock_upstream.calls(upstream_name(deployment)) == 0

    missing = httpx.post(
        f"{live_gateway.v1}/messages",
        json={"model": deployment.name, "max_tokens": 10, "messages": []},
        headers={"anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert "x-api-key" in anthropic_error(missing, 401, "authentication_error")


def test_it_refuses_an_outsider_key_in_anthropic_error_shape(
    live_gateway: Any, mock_upstream: Any, make_key: Any, make_model: Any
) -> None:
    mine = anthropic_deployment(make_model, mock_upstream)
    other = anthropic_deployment(make_model, mock_upstream)
    charlie = make_key(allowed_models=[other.name])

    response = httpx.post(
        f"{live_gateway.v1}/messages",
        json={
            "model": mine.name,
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        headers={"x-api-key": charlie.secret, "anthropic-version": "2023-06-01"},
        timeout=30,
    )

    assert mine.name in anthropic_error(response, 403, "permission_error")
    assert mock_upstream.calls(upstream_name(mine)) == 0
    assert ledger(response.headers["x-request-id"]) == []


def test_it_counts_tokens(
    live_gateway: Any, mock_upstream: Any, make_key: Any, deployment: Any
) -> None:
    client = anthropic_sdk(live_gateway, make_key().secret)
    system = "You are a careful counter of tokens."
    text = "How many tokens is this sentence, exactly, according to you?"

    counted = client.messages.count_tokens(
        model=deployment.name, system=system, messages=[{"role": "user", "content": text}]
    )

    assert counted.input_tokens > 0
    if deployment.provider_model.startswith("anthropic/"):
        # The provider's own count: the mock's rule (system + 4 per message + text).
        assert counted.input_tokens == tokens(system) + 4 + tokens(text)
    longer = client.messages.count_tokens(
        model=deployment.name,
        system=system,
        messages=[{"role": "user", "content": text + " And another clause, for good measure."}],
    )
    assert longer.input_tokens > counted.input_tokens


def test_it_passes_cache_control_through_and_prices_cache_tokens(
    live_gateway: Any, mock_upstream: Any, make_key: Any, make_model: Any
) -> None:
    deployment = anthropic_deployment(
        make_model,
        mock_upstream,
        input_cost_per_million=Decimal("3.00"),
        output_cost_per_million=Decimal("15.00"),
        cached_input_cost_per_million=Decimal("0.30"),
        cache_write_cost_per_million=Decimal("3.75"),
    )
    client = anthropic_sdk(live_gateway, make_key().secret)
    # A prefix no earlier request has shown the mock (its cache is per base model).
    policy = f"Policy {unique('doc')}: " + "Answer carefully and cite sources. " * 40
    body: dict[str, Any] = {
        "model": deployment.name,
        "max_tokens": 100,
        "system": [{"type": "text", "text": policy, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Summarise the policy"}],
    }

    raw_first = client.messages.with_raw_response.create(**body)
    raw_second = client.messages.with_raw_response.create(**body)
    first, second = raw_first.parse(), raw_second.parse()

    assert (first.usage.cache_creation_input_tokens or 0) > 0, first.usage
    assert not first.usage.cache_read_input_tokens, first.usage
    assert (second.usage.cache_read_input_tokens or 0) > 0, second.usage
    assert not second.usage.cache_creation_input_tokens, second.usage
    [row_first] = ledger(raw_first.headers["x-request-id"])
    [row_second] = ledger(raw_second.headers["x-request-id"])
    for message, row in ((first, row_first), (second, row_second)):
        reads = message.usage.cache_read_input_tokens or 0
        writes = message.usage.cache_creation_input_tokens or 0
        assert (row.cached_read_tokens, row.cache_write_tokens) == (reads, writes)
        # The ledger counts prompt tokens in OpenAI's convention: cache tokens included.
        assert row.prompt_tokens == message.usage.input_tokens + reads + writes
        expected = cost_micro_usd(
            input_tokens=message.usage.input_tokens,
            output_tokens=message.usage.output_tokens,
            reads=reads,
            writes=writes,
            prices=("3.00", "15.00"),
            cache_prices=("0.30", "3.75"),
        )
        assert row.charged_cost_micro_usd == expected, (row.charged_cost_micro_usd, expected)
    assert row_first.cache_write_tokens > 0
    assert row_second.cached_read_tokens > 0
    assert row_second.charged_cost_micro_usd < row_first.charged_cost_micro_usd


def test_it_relays_a_provider_refusal_in_anthropic_error_shape(
    live_gateway: Any, mock_upstream: Any, make_key: Any, make_model: Any
) -> None:
    picky = anthropic_deployment(make_model, mock_upstream, controls=";status=400")
    client = anthropic_sdk(live_gateway, make_key().secret)

    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=picky.name, max_tokens=10, messages=[{"role": "user", "content": "Hi"}]
        )

    body = caught.value.body
    assert isinstance(body, dict) and body.get("type") == "error", body
    assert body["error"]["type"] == "invalid_request_error", body
    assert "Mock upstream injected HTTP 400" in body["error"]["message"], body
    # A client error is not retried.
    assert mock_upstream.calls(upstream_name(picky)) == 1


def test_it_refuses_over_budget_in_anthropic_error_shape(
    live_gateway: Any, mock_upstream: Any, make_key: Any, make_model: Any
) -> None:
    deployment = anthropic_deployment(make_model, mock_upstream)
    broke = make_key(max_budget_micro_usd=1)

    response = httpx.post(
        f"{live_gateway.v1}/messages",
        json={
            "model": deployment.name,
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        headers={"x-api-key": broke.secret, "anthropic-version": "2023-06-01"},
        timeout=30,
    )

    assert "budget" in anthropic_error(response, 429, "rate_limit_error")
    assert mock_upstream.calls(upstream_name(deployment)) == 0
    assert ledger(response.headers["x-request-id"]) == []


def test_it_refuses_token_counts_to_outsiders(
    live_gateway: Any, mock_upstream: Any, make_key: Any, make_model: Any
) -> None:
    mine = anthropic_deployment(make_model, mock_upstream)
    other = anthropic_deployment(make_model, mock_upstream)
    body = {"model": mine.name, "messages": [{"role": "user", "content": "Hi"}]}

    outsider = httpx.post(
        f"{live_gateway.v1}/messages/count_tokens",
        json=body,
        headers={
            "x-api-key": make_key(allowed_models=[other.name]).secret,
            "anthropic-version": "2023-06-01",
        },
        timeout=30,
    )
    nobody = httpx.post(
        f"{live_gateway.v1}/messages/count_tokens",
        json=body,
        headers={"x-api-key": "sk-gw-" + "y" * 40, "anthropic-version": "2023-06-01"},
        timeout=30,
    )

    anthropic_error(outsider, 403, "permission_error")
    anthropic_error(nobody, 401, "authentication_error")
    assert mock_upstream.calls(upstream_name(mine)) == 0


def test_it_prices_cache_tokens_of_a_streamed_message(
    live_gateway: Any, mock_upstream: Any, make_key: Any, make_model: Any
) -> None:
    deployment = anthropic_deployment(
        make_model,
        mock_upstream,
        input_cost_per_million=Decimal("3.00"),
        output_cost_per_million=Decimal("15.00"),
        cached_input_cost_per_million=Decimal("0.30"),
        cache_write_cost_per_million=Decimal("3.75"),
    )
    client = anthropic_sdk(live_gateway, make_key().secret)
    policy = f"Streamed policy {unique('doc')}: " + "Quote the handbook verbatim. " * 40

    def streamed() -> tuple[Message, str]:
        with client.messages.stream(
            model=deployment.name,
            max_tokens=100,
            system=[{"type": "text", "text": policy, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "Summarise the handbook"}],
        ) as stream:
            request_id = stream.response.headers["x-request-id"]
            final = stream.get_final_message()
        return final, request_id

    for expect_reads in (False, True):
        message, request_id = streamed()
        reads = message.usage.cache_read_input_tokens or 0
        writes = message.usage.cache_creation_input_tokens or 0
        assert (reads > 0, writes > 0) == (expect_reads, not expect_reads), message.usage
        [row] = ledger(request_id)
        assert row.stream
        assert (row.cached_read_tokens, row.cache_write_tokens) == (reads, writes)
        assert row.prompt_tokens == message.usage.input_tokens + reads + writes
        assert row.completion_tokens == message.usage.output_tokens
        assert row.charged_cost_micro_usd == cost_micro_usd(
            input_tokens=message.usage.input_tokens,
            output_tokens=message.usage.output_tokens,
            reads=reads,
            writes=writes,
            prices=("3.00", "15.00"),
            cache_prices=("0.30", "3.75"),
        )
