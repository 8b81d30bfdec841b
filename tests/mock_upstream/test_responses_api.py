"""The mock upstream's OpenAI Responses API, driven by the official SDK and by litellm.

The server runs as a subprocess exactly as ``make run`` starts it. litellm is driven the way the
gateway drives it: ``litellm.aresponses`` directly, and the Anthropic Messages interface, which
litellm translates to the Responses API for ``openai/`` models. Some tests pin litellm 1.102.4
behaviour that looks like litellm bugs; they say so.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from pydantic import BaseModel

from tests.mock_upstream.conftest import tokens

WEATHER_PARAMETERS: Any = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 3},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "detailed": {"type": "boolean"},
    },
    "required": ["city", "days", "unit", "detailed"],
    "additionalProperties": False,
}
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city.",
    "parameters": WEATHER_PARAMETERS,
}
WEATHER_ARGS = {"city": "mock", "days": 3, "unit": "celsius", "detailed": True}
CLAUDE_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": WEATHER_PARAMETERS,
}
HELLO = "Hello, mock!"

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 20,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def litellm() -> Iterator[ModuleType]:
    # Never fetch the model cost map from the internet; set before litellm is first imported.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    # These tests pin litellm's own default bridge (Anthropic Messages → the Responses
    # API). The gateway switches it to chat completions when it is imported into the
    # same process (gateway/routing.py), so restore the default around each test.
    chat_bridge = litellm.use_chat_completions_url_for_anthropic_messages
    litellm.use_chat_completions_url_for_anthropic_messages = False
    yield litellm
    litellm.use_chat_completions_url_for_anthropic_messages = chat_bridge


def stats(mock_url: str) -> dict[str, Any]:
    return httpx.get(f"{mock_url}/_mock/stats").json()


def raw_events(mock_url: str, request: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) per SSE frame, checking the ``event:``/``data:`` framing."""
    with httpx.stream("POST", f"{mock_url}/v1/responses", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    events = []
    for frame in frames[:-1]:
        name_line, data_line = frame.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    return events


# ---- JSON responses -----------------------------------------------------------------------------


def test_it_answers_in_the_responses_shape(mock_url: str) -> None:
    response = httpx.post(f"{mock_url}/v1/responses", json={"model": "mock-gpt", "input": HELLO})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("resp_")
    assert body["object"] == "response"
    assert isinstance(body["created_at"], int)
    assert body["status"] == "completed"
    assert body["model"] == "mock-gpt"
    defaults: dict[str, Any] = {
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "previous_response_id": None,
        "parallel_tool_calls": True,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "metadata": {},
    }
    for name, value in defaults.items():
        assert body[name] == value, name
    assert body["text"]["format"] == {"type": "text"}
    [item] = body["output"]
    assert item["type"] == "message"
    assert item["id"].startswith("msg_")
    assert item["status"] == "completed"
    assert item["role"] == "assistant"
    [part] = item["content"]
    assert part["type"] == "output_text"
    assert part["annotations"] == []
    assert part["text"].startswith("Mock reply to: Hello, mock!. ")
    assert body["usage"] == {
        "input_tokens": 4 + tokens(HELLO),
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": tokens(part["text"]),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 4 + tokens(HELLO) + tokens(part["text"]),
    }
    # Clients whose base URL already ends in /v1 post to /responses.
    bare = httpx.post(f"{mock_url}/responses", json={"model": "mock-gpt", "input": HELLO})
    assert bare.json()["output"][0]["content"][0]["text"] == part["text"]


def test_it_answers_through_the_sdk(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="gpt-4.1-mini", input="hi")
    assert response.output_text.startswith("Mock reply to: hi. ")
    assert 50 <= len(response.output_text.split()) <= 70
    assert response.model == "gpt-4.1-mini"
    assert isinstance(response.output[0], ResponseOutputMessage)
    assert isinstance(response.output[0].content[0], ResponseOutputText)
    assert response.usage is not None
    assert response.usage.input_tokens == 4 + tokens("hi")
    assert response.usage.output_tokens == tokens(response.output_text)
    assert response.usage.total_tokens == response.usage.input_tokens + tokens(response.output_text)
    again = oai.responses.create(model="gpt-4.1-mini", input="hi")
    assert again.output_text == response.output_text
    assert again.id != response.id


def test_it_takes_a_list_of_input_items_with_instructions(oai: openai.OpenAI) -> None:
    instructions = "You are terse."
    conversation: Any = [
        {"role": "user", "content": "First question"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "First answer"}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Second"},
                {"type": "input_text", "text": "question"},
            ],
        },
    ]
    response = oai.responses.create(model="mock-gpt", instructions=instructions, input=conversation)
    assert response.output_text.startswith("Mock reply to: Second question. ")
    assert response.instructions == instructions
    assert response.usage is not None
    assert response.usage.input_tokens == (
        4
        + tokens(instructions)
        + 4
        + tokens("First question")
        + 4
        + tokens("First answer")
        + 4
        + tokens("Second")
        + tokens("question")
    )


def test_it_calls_a_function_tool(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="mock-gpt", input=HELLO, tools=[WEATHER_TOOL])
    [call] = response.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert call.name == "get_weather"
    assert call.id is not None and call.id.startswith("fc_")
    assert call.call_id.startswith("call_")
    assert call.status == "completed"
    assert json.loads(call.arguments) == WEATHER_ARGS
    assert response.output_text == ""
    assert response.usage is not None
    assert response.usage.output_tokens == tokens(call.arguments)
    tools_json = json.dumps([WEATHER_TOOL], separators=(",", ":"))
    assert response.usage.input_tokens == 4 + tokens(HELLO) + tokens(tools_json)
    assert response.tools[0].name == "get_weather"  # type: ignore[union-attr]
    assert response.tools[0].strict is True  # type: ignore[union-attr]

    # The agent loop: after the function output the reply is text again.
    follow_up = oai.responses.create(
        model="mock-gpt",
        tools=[WEATHER_TOOL],
        input=[
            {"role": "user", "content": HELLO},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
    )
    assert isinstance(follow_up.output[0], ResponseOutputMessage)
    assert follow_up.output_text.startswith("Mock reply to: Hello, mock!. ")
    assert follow_up.usage is not None
    assert follow_up.usage.input_tokens == (
        4
        + tokens(HELLO)
        + 4
        + tokens(call.name)
        + tokens(call.arguments)
        + 4
        + tokens("Sunny, 21 C")
        + tokens(tools_json)
    )


def test_it_honours_tool_choice(oai: openai.OpenAI) -> None:
    other: Any = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
    named = oai.responses.create(
        model="mock-gpt",
        input=HELLO,
        tools=[WEATHER_TOOL, other],
        tool_choice={"type": "function", "name": "get_time"},
    )
    assert isinstance(named.output[0], ResponseFunctionToolCall)
    assert named.output[0].name == "get_time"
    assert named.output[0].arguments == "{}"

    none = oai.responses.create(
        model="mock-gpt", input=HELLO, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert isinstance(none.output[0], ResponseOutputMessage)

    after_output: Any = [
        {"role": "user", "content": HELLO},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    forced = oai.responses.create(
        model="mock-gpt", input=after_output, tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert isinstance(forced.output[0], ResponseFunctionToolCall)

    with pytest.raises(openai.BadRequestError) as unknown:
        oai.responses.create(
            model="mock-gpt",
            input=HELLO,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "nope"},
        )
    assert unknown.value.param == "tool_choice"


def test_it_rejects_chat_style_tools_like_upstream(oai: openai.OpenAI) -> None:
    chat_tool: Any = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="mock-gpt", input=HELLO, tools=[chat_tool])
    assert caught.value.param == "tools[0].name"
    assert caught.value.code == "missing_required_parameter"


def test_it_fills_a_json_schema_text_format(oai: openai.OpenAI) -> None:
    class Weather(BaseModel):
        city: str
        days: int

    parsed = oai.responses.parse(model="mock-gpt", input=HELLO, text_format=Weather)
    assert parsed.output_parsed == Weather(city="mock", days=1)


def test_it_stops_at_max_output_tokens(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="mock-gpt", input=HELLO, max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 16
    assert isinstance(response.output[0], ResponseOutputMessage)
    assert response.output[0].status == "incomplete"
    assert response.usage is not None
    assert response.usage.output_tokens == 16
    assert tokens(response.output_text) == 16

    roomy = oai.responses.create(model="mock-gpt", input=HELLO, max_output_tokens=1000)
    assert roomy.status == "completed"
    assert roomy.incomplete_details is None

    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="mock-gpt", input=HELLO, max_output_tokens=5)
    assert caught.value.param == "max_output_tokens"
    assert caught.value.code == "integer_below_min_value"


def test_it_rejects_bad_input(oai: openai.OpenAI, mock_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="mock-gpt", input=[])
    assert caught.value.param == "input"
    response = httpx.post(f"{mock_url}/v1/responses", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# ---- Streaming --------------------------------------------------------------------------------


def test_it_streams_openai_event_sequence(mock_url: str) -> None:
    events = raw_events(mock_url, {"model": "mock-gpt", "input": HELLO, "stream": True})
    assert [name for name, _ in events] == TEXT_EVENTS
    created = events[0][1]["response"]
    assert created["status"] == "in_progress"
    assert created["output"] == []
    assert created["usage"] is None
    assert events[1][1]["response"]["id"] == created["id"]
    added = events[2][1]
    assert added["output_index"] == 0
    assert added["item"]["type"] == "message"
    assert added["item"]["status"] == "in_progress"
    assert added["item"]["content"] == []
    item_id = added["item"]["id"]
    part_added = events[3][1]
    assert part_added["part"]["type"] == "output_text"
    assert part_added["part"]["text"] == ""
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    for delta in deltas:
        assert (delta["item_id"], delta["output_index"], delta["content_index"]) == (item_id, 0, 0)
    text = "".join(delta["delta"] for delta in deltas)
    assert text.startswith("Mock reply to: Hello, mock!. ")
    assert events[-4][1]["text"] == text
    assert events[-3][1]["part"]["text"] == text
    assert events[-2][1]["item"]["status"] == "completed"
    assert events[-2][1]["item"]["content"][0]["text"] == text
    final = events[-1][1]["response"]
    assert final["id"] == created["id"]
    assert final["status"] == "completed"
    assert final["output"] == [events[-2][1]["item"]]
    assert final["usage"]["output_tokens"] == tokens(text)
    assert final["usage"]["input_tokens"] == 4 + tokens(HELLO)


def test_it_streams_through_the_sdk_helper(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="mock-gpt;chunks=5", input=HELLO) as stream:
        kinds = []
        pieces = []
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                pieces.append(event.delta)
        final = stream.get_final_response()
    assert kinds == [*TEXT_EVENTS[:4], *TEXT_EVENTS[4:5] * 5, *TEXT_EVENTS[-4:]]
    assert final.output_text == "".join(pieces)
    assert final.usage is not None
    assert final.usage.output_tokens == tokens(final.output_text)


def test_it_streams_function_calls(oai: openai.OpenAI, mock_url: str) -> None:
    request: Any = {"model": "mock-gpt;chunks=4", "input": HELLO, "tools": [WEATHER_TOOL]}
    events = raw_events(mock_url, {**request, "stream": True})
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 4,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[2][1]["item"]
    assert added["type"] == "function_call"
    assert added["arguments"] == ""
    assert added["name"] == "get_weather"
    arguments = "".join(data["delta"] for name, data in events if name.endswith(".delta"))
    assert json.loads(arguments) == WEATHER_ARGS
    assert events[-3][1]["arguments"] == arguments
    assert events[-2][1]["item"]["arguments"] == arguments
    assert events[-2][1]["item"]["call_id"] == added["call_id"]

    stream = oai.responses.create(**request, stream=True)
    completed = [event for event in stream if event.type == "response.completed"]
    [call] = completed[0].response.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert json.loads(call.arguments) == WEATHER_ARGS


def test_it_streams_to_the_async_client(mock_url: str) -> None:
    async def collect() -> tuple[str, int]:
        client = openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="x", max_retries=0)
        async with client.responses.stream(model="mock-gpt;chunks=3", input=HELLO) as stream:
            deltas = [event async for event in stream if event.type.endswith(".delta")]
            final = await stream.get_final_response()
        await client.close()
        assert final.usage is not None
        return final.output_text, len(deltas) * 1000 + final.usage.output_tokens

    text, packed = asyncio.run(collect())
    assert text.startswith("Mock reply to: Hello, mock!")
    assert packed == 3 * 1000 + tokens(text)


def test_it_ends_a_truncated_stream_with_response_incomplete(mock_url: str) -> None:
    # OpenAI sends response.incomplete, not response.completed, on a max_output_tokens cut. The
    # Python SDK's stream helper only accepts response.completed (openai-python PR #3538).
    request = {"model": "mock-gpt;chunks=3", "input": HELLO, "max_output_tokens": 20}
    events = raw_events(mock_url, {**request, "stream": True})
    name, data = events[-1]
    assert name == "response.incomplete"
    assert data["response"]["status"] == "incomplete"
    assert data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["response"]["usage"]["output_tokens"] == 20
    assert events[-2][1]["item"]["status"] == "incomplete"


# ---- Controls ---------------------------------------------------------------------------------


def test_it_injects_errors(oai: openai.OpenAI, mock_url: str) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        oai.responses.create(model="mock-gpt;status=429;retry_after=2", input="hi")
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.code == "rate_limit_exceeded"

    with pytest.raises(openai.InternalServerError):
        oai.responses.create(model="mock-gpt", input="hi", extra_headers={"x-mock-status": "500"})

    model = "mock-gpt;fail_first=2;retry_after=0.01"
    retrying = openai.OpenAI(base_url=f"{mock_url}/v1", api_key="x", max_retries=2)
    assert retrying.responses.create(model=model, input="hi").output_text
    assert stats(mock_url)["by_model"][model] == 3


def test_it_times_out_and_adds_latency(mock_url: str) -> None:
    client = openai.OpenAI(base_url=f"{mock_url}/v1", api_key="x", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        client.responses.create(model="mock-gpt;timeout=1", input="hi")
    with pytest.raises(openai.APITimeoutError):
        client.responses.create(model="mock-gpt;latency_ms=1500", input="hi")


def test_it_drops_the_connection_mid_stream(oai: openai.OpenAI) -> None:
    kinds = []
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        stream = oai.responses.create(model="mock-gpt;drop_after_chunks=3", input="hi", stream=True)
        for event in stream:
            kinds.append(event.type)
    assert kinds == TEXT_EVENTS[:4] + TEXT_EVENTS[4:5] * 3


def test_it_shapes_usage_with_controls(oai: openai.OpenAI, mock_url: str) -> None:
    exact = oai.responses.create(model="mock-gpt;output_tokens=250", input=HELLO)
    assert exact.usage is not None
    assert exact.usage.output_tokens == 250
    assert tokens(exact.output_text) == 250

    overridden = oai.responses.create(
        model="mock-gpt;cached_tokens=7;reasoning_tokens=9;output_tokens=20", input=HELLO
    )
    assert overridden.usage is not None
    assert overridden.usage.input_tokens_details.cached_tokens == 7
    assert overridden.usage.output_tokens_details.reasoning_tokens == 9
    assert overridden.usage.output_tokens == 20

    reasoner = oai.responses.create(model="mock-reasoner", input=HELLO)
    assert reasoner.usage is not None
    visible = tokens(reasoner.output_text)
    assert reasoner.usage.output_tokens_details.reasoning_tokens == visible
    assert reasoner.usage.output_tokens == 2 * visible
    assert reasoner.reasoning is not None
    assert reasoner.reasoning.effort == "medium"

    long_prompt = "word " * 1000
    cached = oai.responses.create(model="mock-gpt", input=long_prompt)
    assert cached.usage is not None
    assert cached.usage.input_tokens == 4 + tokens(long_prompt)
    # The largest multiple of 128 <= half the prompt: 1254 // 2 = 627 -> 512.
    assert cached.usage.input_tokens_details.cached_tokens == 512

    assert oai.responses.create(model="mock-gpt;no_usage=1", input=HELLO).usage is None
    events = raw_events(mock_url, {"model": "mock-gpt;no_usage=1", "input": HELLO, "stream": True})
    assert events[-1][0] == "response.completed"
    assert events[-1][1]["response"]["usage"] is None


def test_it_counts_responses_requests(oai: openai.OpenAI, mock_url: str) -> None:
    oai.responses.create(model="mock-gpt", input="hi")
    list(oai.responses.create(model="mock-gpt", input="hi", stream=True))
    with pytest.raises(openai.RateLimitError):
        oai.responses.create(model="mock-gpt;status=429", input="hi")
    httpx.post(f"{mock_url}/responses", json={"model": "mock-gpt", "input": "hi"})
    assert stats(mock_url) == {
        "total": 4,
        "by_model": {"mock-gpt": 3, "mock-gpt;status=429": 1},
        "by_path": {"/v1/responses": 3, "/responses": 1},
    }


# ---- litellm ----------------------------------------------------------------------------------


def test_litellm_anthropic_messages_bridge(litellm: ModuleType, mock_url: str) -> None:
    from litellm.anthropic_interface import messages

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        common: Any = {"api_base": f"{mock_url}/v1", "api_key": "x"}
        short = await messages.acreate(
            model="openai/mock-gpt",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi"}],
            **common,
        )
        full = await messages.acreate(
            model="openai/mock-gpt",
            max_tokens=1000,
            system="Be brief.",
            messages=[{"role": "user", "content": "hi"}],
            **common,
        )
        return short, full

    short, full = asyncio.run(run())
    assert short["type"] == "message"
    assert short["role"] == "assistant"
    assert short["model"] == "mock-gpt"
    [block] = short["content"]
    assert block["type"] == "text"
    assert block["text"].startswith("Mock reply to: hi. ")
    assert short["stop_reason"] == "max_tokens"
    assert short["usage"]["input_tokens"] == 4 + tokens("hi")
    assert short["usage"]["output_tokens"] == 50
    assert full["stop_reason"] == "end_turn"
    assert full["usage"]["input_tokens"] == 4 + tokens("Be brief.") + 4 + tokens("hi")
    assert full["usage"]["output_tokens"] == tokens(full["content"][0]["text"])
    assert stats(mock_url)["by_path"] == {"/v1/responses": 2}


def _anthropic_sse(chunks: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in b"".join(chunks).decode().split("\n\n"):
        if frame:
            name, data = frame.split("\n")
            events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def _collect_stream(**kwargs: Any) -> list[tuple[str, dict[str, Any]]]:
    from litellm.anthropic_interface import messages

    async def run() -> list[bytes]:
        stream = await messages.acreate(stream=True, **kwargs)
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    return _anthropic_sse(chunks)


def test_litellm_anthropic_messages_streams(litellm: ModuleType, mock_url: str) -> None:
    # A model litellm knows ("gpt-4o") so it streams natively; controls ride in headers because
    # a ";control" suffix makes the model unknown to litellm (see the next test).
    events = _collect_stream(
        model="openai/gpt-4o",
        api_base=f"{mock_url}/v1",
        api_key="x",
        max_tokens=1000,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-chunks": "3"},
    )
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text.startswith("Mock reply to: hi. ")
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["input_tokens"] == 4 + tokens("hi")
    assert delta["usage"]["output_tokens"] == tokens(text)


def test_litellm_fakes_streams_for_models_it_does_not_know(
    litellm: ModuleType, mock_url: str
) -> None:
    # litellm 1.102.4 quirk: supports_native_streaming() answers False for a model missing from
    # its cost map, so stream=True becomes a non-streaming upstream call that litellm re-chunks.
    # Stream-only controls (drop_after_chunks, chunks, chunk_delay_ms) then have no effect.
    events = _collect_stream(
        model="openai/mock-gpt;drop_after_chunks=1",
        api_base=f"{mock_url}/v1",
        api_key="x",
        max_tokens=1000,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert events[0][0] == "message_start"
    assert events[-1][0] == "message_stop"
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert sum(name == "content_block_delta" for name, _ in events) > 20


def test_litellm_anthropic_messages_tool_use(litellm: ModuleType, mock_url: str) -> None:
    from litellm.anthropic_interface import messages

    common: Any = {"api_base": f"{mock_url}/v1", "api_key": "x", "max_tokens": 500}
    hello: Any = [{"role": "user", "content": HELLO}]

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        call = await messages.acreate(
            model="openai/mock-gpt", messages=hello, tools=[CLAUDE_TOOL], **common
        )
        tool_use = call["content"][0]
        answer = await messages.acreate(
            model="openai/mock-gpt",
            tools=[CLAUDE_TOOL],
            messages=[
                *hello,
                {"role": "assistant", "content": [tool_use]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": tool_use["id"], "content": "Sunny"},
                        {"type": "text", "text": "Thanks!"},
                    ],
                },
            ],
            **common,
        )
        return call, answer

    call, answer = asyncio.run(run())
    assert call["stop_reason"] == "tool_use"
    [block] = call["content"]
    assert block["type"] == "tool_use"
    assert block["name"] == "get_weather"
    assert block["id"].startswith("call_")
    assert block["input"] == WEATHER_ARGS
    assert call["usage"]["output_tokens"] == tokens(json.dumps(WEATHER_ARGS, separators=(",", ":")))
    # The tool result arrives as a function_call_output followed by the user's text, so the
    # mock answers in text and the agent loop ends.
    assert answer["stop_reason"] == "end_turn"
    assert answer["content"][0]["text"].startswith("Mock reply to: Thanks!. ")

    events = _collect_stream(
        model="openai/gpt-4o",
        messages=hello,
        tools=[CLAUDE_TOOL],
        extra_headers={"x-mock-chunks": "4"},
        **common,
    )
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[1][1]["content_block"]
    assert (start["type"], start["name"]) == ("tool_use", "get_weather")
    partial = "".join(
        data["delta"]["partial_json"] for name, data in events if name == "content_block_delta"
    )
    assert json.loads(partial) == WEATHER_ARGS
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_litellm_aresponses(litellm: ModuleType, mock_url: str) -> None:
    async def run() -> tuple[Any, list[Any]]:
        common: Any = {"api_base": f"{mock_url}/v1", "api_key": "x", "input": "hi"}
        response = await litellm.aresponses(model="openai/mock-gpt", **common)
        stream = await litellm.aresponses(
            model="openai/gpt-4o", stream=True, extra_headers={"x-mock-chunks": "2"}, **common
        )
        return response, [event async for event in stream]

    response, events = asyncio.run(run())
    assert response.status == "completed"
    assert response.model == "mock-gpt"
    text = response.output[0].content[0].text
    assert text.startswith("Mock reply to: hi. ")
    assert response.usage.input_tokens == 4 + tokens("hi")
    assert response.usage.output_tokens == tokens(text)

    kinds = [str(getattr(event.type, "value", event.type)) for event in events]
    assert kinds == [*TEXT_EVENTS[:4], *TEXT_EVENTS[4:5] * 2, *TEXT_EVENTS[-4:]]
    final = events[-1].response
    assert final.status == "completed"
    assert final.usage.output_tokens == tokens(final.output[0].content[0].text)


def test_litellm_swallows_a_dropped_anthropic_stream(litellm: ModuleType, mock_url: str) -> None:
    # litellm 1.102.4 bug: AnthropicResponsesStreamWrapper logs upstream read errors and simply
    # ends the stream, so the caller sees neither an exception nor message_stop.
    events = _collect_stream(
        model="openai/gpt-4o",
        api_base=f"{mock_url}/v1",
        api_key="x",
        max_tokens=1000,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-drop-after-chunks": "2"},
    )
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
    ]


def test_litellm_raises_small_max_tokens_to_the_upstream_minimum(
    litellm: ModuleType, mock_url: str
) -> None:
    # OpenAI (and the mock) reject max_output_tokens below 16; litellm raises Anthropic's
    # max_tokens=1 to 16, so the reply is 16 tokens long rather than 1.
    from litellm.anthropic_interface import messages

    reply = asyncio.run(
        messages.acreate(
            model="openai/mock-gpt",
            api_base=f"{mock_url}/v1",
            api_key="x",
            max_tokens=1,
            messages=[{"role": "user", "content": "hi"}],
        )
    )
    assert reply["stop_reason"] == "max_tokens"
    assert reply["usage"]["output_tokens"] == 16
