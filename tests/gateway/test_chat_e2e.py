"""POST /v1/chat/completions, as the official openai SDK (sync and async) uses it."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from pydantic import BaseModel

from tests.support.http import content_of, first_tool_call, unique, usage_of
from tests.support.money import cost_micro_usd, usd, usd_str

pytestmark = pytest.mark.e2e

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit", "days"],
        },
    },
}


def sdk(live_gateway, secret: str) -> OpenAI:
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


def test_it_answers_a_chat_completion_with_the_sync_sdk(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    raw = sdk(live_gateway, issued.secret).chat.completions.with_raw_response.create(
        model=model.name, messages=HELLO
    )
    reply = raw.parse()

    assert reply.object == "chat.completion"
    assert reply.id
    assert len(reply.choices) == 1
    assert reply.choices[0].message.role == "assistant"
    assert content_of(reply).startswith("Mock reply to: Hello")
    assert reply.choices[0].finish_reason == "stop"
    usage = usage_of(reply)
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert raw.headers["x-request-id"]
    assert raw.headers["x-gateway-request-id"]
    assert model.name in raw.headers["x-gateway-model"]
    assert raw.headers["x-gateway-attempts"] == "1"
    assert raw.headers["content-type"].startswith("application/json")


def test_it_reports_the_cost_of_the_usage_in_x_gateway_cost_usd(live_gateway, make_model, make_key):
    model = make_model()  # 1.00 USD in, 2.00 USD out per 1M tokens
    issued = make_key()

    raw = sdk(live_gateway, issued.secret).chat.completions.with_raw_response.create(
        model=model.name, messages=HELLO
    )
    usage = usage_of(raw.parse())

    expected = cost_micro_usd(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        prices=("1.00", "2.00"),
    )
    assert expected > 0
    header = raw.headers["x-gateway-cost-usd"]
    assert header == usd_str(expected)
    assert usd(header) == expected


def test_it_rounds_the_cost_up_to_the_next_micro_dollar(live_gateway, make_model, make_key):
    name = unique("cheap")
    model = make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens=3",
        input_cost_per_million=Decimal("0.1"),
        output_cost_per_million=Decimal("0.5"),
    )
    issued = make_key()

    raw = sdk(live_gateway, issued.secret).chat.completions.with_raw_response.create(
        model=model.name, messages=HELLO
    )
    usage = usage_of(raw.parse())

    assert usage.completion_tokens == 3
    exact = usage.prompt_tokens * Decimal("0.1") + usage.completion_tokens * Decimal("0.5")
    # The precondition that makes this test about rounding: the exact cost is fractional.
    assert exact != exact.to_integral_value(), exact
    expected = cost_micro_usd(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        prices=("0.1", "0.5"),
    )
    assert expected == int(exact) + 1
    assert raw.headers["x-gateway-cost-usd"] == usd_str(expected)


def test_it_answers_concurrent_requests_from_the_async_sdk(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    async def run() -> list[tuple[str, str, str]]:
        client = AsyncOpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)
        try:

            async def one(index: int) -> tuple[str, str, str]:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model.name, messages=[{"role": "user", "content": f"Question {index}"}]
                )
                reply = raw.parse()
                return (
                    content_of(reply),
                    raw.headers["x-request-id"],
                    raw.headers["x-gateway-cost-usd"],
                )

            return list(await asyncio.gather(*(one(i) for i in range(5))))
        finally:
            await client.close()

    results = asyncio.run(run())

    for index, (content, _, cost) in enumerate(results):
        assert content.startswith(f"Mock reply to: Question {index}")
        assert usd(cost) > 0
    assert len({request_id for _, request_id, _ in results}) == 5


def test_it_returns_tool_calls(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    reply = sdk(live_gateway, issued.secret).chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
    )

    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls or []) == 1
    call = first_tool_call(reply)
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "mock", "unit": "celsius", "days": 1}


def test_it_completes_an_agent_loop_after_a_tool_result(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()
    client = sdk(live_gateway, issued.secret)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]

    first = client.chat.completions.create(
        model=model.name, messages=messages, tools=[WEATHER_TOOL]
    )
    call = first_tool_call(first)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))  # type: ignore[arg-type]
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'})
    second = client.chat.completions.create(
        model=model.name, messages=messages, tools=[WEATHER_TOOL]
    )

    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content


def test_it_passes_a_json_schema_response_format_through(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }

    reply = sdk(live_gateway, issued.secret).chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "Answer in JSON"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    )

    # The mock fills the schema only if the gateway forwarded response_format untouched.
    assert json.loads(content_of(reply)) == {"answer": "mock", "confidence": 1}


def test_it_serves_the_sdk_structured_output_helper(live_gateway, make_model, make_key):
    class Answer(BaseModel):
        answer: str
        votes: int

    model = make_model()
    issued = make_key()

    parsed = sdk(live_gateway, issued.secret).chat.completions.parse(
        model=model.name,
        messages=[{"role": "user", "content": "Answer in JSON"}],
        response_format=Answer,
    )

    assert parsed.choices[0].message.parsed == Answer(answer="mock", votes=1)


def test_it_accepts_the_standard_parameters(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    raw = sdk(live_gateway, issued.secret).chat.completions.with_raw_response.create(
        model=model.name,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello", "name": "alice"},
        ],
        temperature=0.2,
        top_p=0.9,
        max_tokens=50,
        stop=["\n\n"],
        n=1,
        seed=42,
        user="end-user-123",
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logit_bias={"50256": -100},
        response_format={"type": "text"},
        metadata={"purpose": "e2e"},
        service_tier="auto",
    )

    assert raw.http_response.status_code == 200
    assert content_of(raw.parse()).startswith("Mock reply to: Hello")


def test_it_honours_max_tokens_n_and_stop(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()
    client = sdk(live_gateway, issued.secret)

    limited = client.chat.completions.create(model=model.name, messages=HELLO, max_tokens=5, n=2)
    stopped = client.chat.completions.create(model=model.name, messages=HELLO, stop=["Hello"])

    assert [c.index for c in limited.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in limited.choices)
    assert usage_of(limited).completion_tokens == 10
    assert stopped.choices[0].message.content == "Mock reply to: "


def test_it_accepts_the_key_in_the_x_api_key_header(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    response = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json={"model": model.name, "messages": HELLO},
        headers={"x-api-key": issued.secret},
        timeout=30,
    )

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("Mock reply to: Hello")
