"""The mock upstream, driven over real HTTP by the official OpenAI and Anthropic SDKs.

The server runs as a subprocess exactly as ``make run`` starts it; no database is involved.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from tests.mock_upstream.conftest import tokens

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 3},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "detailed": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {"$ref": "#/$defs/Point"},
            },
            "required": ["city", "days", "unit", "where"],
            "$defs": {
                "Point": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                }
            },
        },
    },
}
WEATHER_ARGS = {
    "city": "mock",
    "days": 3,
    "unit": "celsius",
    "detailed": True,
    "tags": ["mock"],
    "where": {"lat": 1, "lon": 1},
}
OTHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
CLAUDE_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
HELLO: Any = [{"role": "user", "content": "Hello, mock!"}]


@pytest.fixture
def claude(mock_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock_url, api_key="x", max_retries=0)


def first_function_call(completion: ChatCompletion) -> ChatCompletionMessageFunctionToolCall:
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert isinstance(calls[0], ChatCompletionMessageFunctionToolCall)
    return calls[0]


def stats(mock_url: str) -> dict[str, Any]:
    return httpx.get(f"{mock_url}/_mock/stats").json()


# ---- OpenAI chat ----------------------------------------------------------------------------


def test_it_answers_chat_in_openai_shape(mock_url: str) -> None:
    response = httpx.post(
        f"{mock_url}/v1/chat/completions", json={"model": "mock-gpt", "messages": HELLO}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "mock-gpt"
    assert body["system_fingerprint"]
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["refusal"] is None
    assert choice["message"]["content"].startswith("Mock reply to: Hello, mock!. ")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 4 + tokens("Hello, mock!")
    assert usage["completion_tokens"] == tokens(choice["message"]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert usage["completion_tokens_details"] == {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }


def test_it_answers_chat_through_the_openai_sdk(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    content = completion.choices[0].message.content
    assert content is not None
    assert 50 <= len(content.split()) <= 70
    assert completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == tokens(content)


def test_it_is_deterministic(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(model="mock-gpt", messages=HELLO)
    second = oai.chat.completions.create(model="mock-gpt", messages=HELLO)
    other = oai.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "Something else"}]
    )
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage == second.usage
    assert first.id != second.id
    assert other.choices[0].message.content != first.choices[0].message.content


def test_it_streams_chat_without_usage_by_default(oai: openai.OpenAI) -> None:
    plain = oai.chat.completions.create(model="mock-gpt", messages=HELLO)
    chunks = list(oai.chat.completions.create(model="mock-gpt", messages=HELLO, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content_chunks = chunks[1:-1]
    assert len(content_chunks) == 20
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == (
        plain.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1


def test_it_streams_chat_with_include_usage(mock_url: str) -> None:
    request = {
        "model": "mock-gpt",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{mock_url}/v1/chat/completions", json=request) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    assert frames[-2] == "data: [DONE]"
    events = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    assert all("usage" in event and event["usage"] is None for event in events[:-1])
    assert events[-2]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    usage_chunk = events[-1]
    assert usage_chunk["choices"] == []
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert usage_chunk["usage"]["completion_tokens"] == tokens(text)
    assert usage_chunk["usage"]["prompt_tokens"] == 4 + tokens("Hello, mock!")


def test_it_streams_usage_through_the_sdk(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="mock-gpt",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0


def test_it_streams_to_the_async_client(mock_url: str) -> None:
    async def collect() -> tuple[str, int]:
        client = openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model="mock-gpt;chunks=5",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = []
        completion_tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                completion_tokens = chunk.usage.completion_tokens
        await client.close()
        return "".join(parts), len(parts) * 1000 + completion_tokens

    text, packed = asyncio.run(collect())
    assert text.startswith("Mock reply to: Hello, mock!")
    assert packed == 5 * 1000 + tokens(text)


def test_it_returns_n_choices(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="mock-gpt", messages=HELLO, n=3)
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert completion.usage is not None
    content = completion.choices[0].message.content or ""
    assert completion.usage.completion_tokens == 3 * tokens(content)


def test_it_streams_n_choices(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(model="mock-gpt;chunks=4", messages=HELLO, n=2, stream=True)
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""


def test_it_truncates_at_max_tokens(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="mock-gpt", messages=HELLO, max_tokens=7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    assert tokens(completion.choices[0].message.content or "") == 7

    newer = oai.chat.completions.create(model="mock-gpt", messages=HELLO, max_completion_tokens=3)
    assert newer.choices[0].finish_reason == "length"
    assert newer.usage is not None
    assert newer.usage.completion_tokens == 3


def test_it_honours_stop(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="mock-gpt", messages=HELLO, stop=["deterministic", "never-there"]
    )
    assert completion.choices[0].message.content == "Mock reply to: Hello, mock!. This "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == tokens("Mock reply to: Hello, mock!. This ")


def test_it_calls_the_first_tool(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="mock-gpt", messages=HELLO, tools=[WEATHER_TOOL, OTHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = first_function_call(completion)
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS
    assert completion.usage is not None
    assert completion.usage.completion_tokens == tokens(call.function.arguments)


def test_it_calls_the_tool_named_in_tool_choice(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="mock-gpt",
        messages=HELLO,
        tools=[WEATHER_TOOL, OTHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    call = first_function_call(completion)
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"zone": "mock"}


def test_it_answers_in_text_when_tool_choice_is_none_or_after_a_tool_result(
    oai: openai.OpenAI,
) -> None:
    none = oai.chat.completions.create(
        model="mock-gpt", messages=HELLO, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason == "stop"

    messages = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]
    after = oai.chat.completions.create(model="mock-gpt", messages=messages, tools=[WEATHER_TOOL])
    assert after.choices[0].finish_reason == "stop"
    assert (after.choices[0].message.content or "").startswith("Mock reply to: Hello, mock!")


def test_it_streams_tool_call_arguments(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="mock-gpt", messages=HELLO, tools=[WEATHER_TOOL], stream=True
        )
    )
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert first.tool_calls is not None
    assert first.tool_calls[0].id is not None
    assert first.tool_calls[0].function is not None
    assert first.tool_calls[0].function.name == "get_weather"
    fragments = []
    for chunk in chunks[1:-1]:
        calls = chunk.choices[0].delta.tool_calls
        assert calls is not None
        assert calls[0].index == 0
        assert calls[0].function is not None
        fragments.append(calls[0].function.arguments or "")
    assert len(fragments) == 20
    assert json.loads("".join(fragments)) == WEATHER_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_it_fills_json_response_formats(oai: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "score": {"type": "number"}},
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    structured = oai.chat.completions.create(
        model="mock-gpt",
        messages=HELLO,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        },
    )
    assert json.loads(structured.choices[0].message.content or "") == {
        "answer": "mock",
        "score": 1,
    }
    loose = oai.chat.completions.create(
        model="mock-gpt", messages=HELLO, response_format={"type": "json_object"}
    )
    assert json.loads(loose.choices[0].message.content or "")["reply"].startswith("Mock reply")


def test_it_counts_tokens_and_caches_long_prompts(oai: openai.OpenAI) -> None:
    long_text = "a" * 4000  # 1000 tokens
    messages: Any = [
        {"role": "system", "content": long_text},
        {"role": "user", "content": [{"type": "text", "text": "b" * 400}]},
    ]
    completion = oai.chat.completions.create(model="mock-gpt", messages=messages)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4 + 1000 + 4 + 100
    # floor(1108 / 2) = 554 -> largest multiple of 128 is 512.
    assert completion.usage.prompt_tokens_details.cached_tokens == 512  # type: ignore[union-attr]

    short = oai.chat.completions.create(model="mock-gpt", messages=HELLO)
    assert short.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]


def test_it_reports_reasoning_tokens_for_reasoning_models(oai: openai.OpenAI) -> None:
    for model in ("o3-mini", "mock-reasoner"):
        completion = oai.chat.completions.create(model=model, messages=HELLO)
        usage = completion.usage
        assert usage is not None
        reasoning = usage.completion_tokens_details.reasoning_tokens  # type: ignore[union-attr]
        assert reasoning == usage.completion_tokens // 2
        assert usage.completion_tokens == reasoning + tokens(
            completion.choices[0].message.content or ""
        )
    limited = oai.chat.completions.create(model="o3-mini", messages=HELLO, max_completion_tokens=11)
    assert limited.usage is not None
    assert limited.usage.completion_tokens == 11
    assert limited.usage.completion_tokens_details.reasoning_tokens == 5  # type: ignore[union-attr]
    assert limited.choices[0].finish_reason == "length"


# ---- OpenAI embeddings, legacy completions, models -----------------------------------------


def test_it_makes_embeddings_as_floats_and_base64(oai: openai.OpenAI) -> None:
    floats = oai.embeddings.create(
        model="mock-embed", input=["hello", "world"], encoding_format="float"
    )
    assert [item.index for item in floats.data] == [0, 1]
    assert all(len(item.embedding) == 8 for item in floats.data)
    for item in floats.data:
        assert math.isclose(sum(v * v for v in item.embedding), 1.0, rel_tol=1e-5)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2 * tokens("hello")

    # Without encoding_format the SDK asks for base64 and decodes the float32 bytes itself.
    decoded = oai.embeddings.create(model="mock-embed", input=["hello", "world"])
    assert [item.embedding for item in decoded.data] == [item.embedding for item in floats.data]

    wide = oai.embeddings.create(model="mock-embed", input="hello", dimensions=256)
    assert len(wide.data[0].embedding) == 256

    tokens_input = oai.embeddings.create(model="mock-embed", input=[[1, 2, 3]])
    assert tokens_input.usage.prompt_tokens == 3


def test_it_answers_legacy_completions(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="mock-instruct", prompt="Say hi", max_tokens=5)
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == tokens("Say hi")

    chunks = list(
        oai.completions.create(
            model="mock-instruct",
            prompt="Say hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text.startswith("Mock reply to: Say hi.")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == tokens(text)


def test_it_lists_models(oai: openai.OpenAI) -> None:
    ids = [model.id for model in oai.models.list()]
    assert "mock-gpt" in ids
    assert "mock-claude" in ids


# ---- Anthropic ------------------------------------------------------------------------------


def test_it_answers_messages_through_the_anthropic_sdk(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="mock-claude",
        max_tokens=1024,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello, claude!"}],
    )
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "mock-claude"
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    text = message.content[0].text  # type: ignore[union-attr]
    assert text.startswith("Mock reply to: Hello, claude!.")
    assert message.usage.input_tokens == tokens("Be brief.") + 4 + tokens("Hello, claude!")
    assert message.usage.output_tokens == tokens(text)
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0


def test_it_stops_anthropic_messages_at_max_tokens_and_stop_sequences(
    claude: anthropic.Anthropic,
) -> None:
    short = claude.messages.create(model="mock-claude", max_tokens=4, messages=HELLO)
    assert short.stop_reason == "max_tokens"
    assert short.usage.output_tokens == 4

    stopped = claude.messages.create(
        model="mock-claude", max_tokens=500, messages=HELLO, stop_sequences=["mock answer"]
    )
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == "mock answer"
    assert stopped.content[0].text == "Mock reply to: Hello, mock!. This deterministic "  # type: ignore[union-attr]


def test_it_streams_anthropic_messages(claude: anthropic.Anthropic, mock_url: str) -> None:
    with claude.messages.stream(model="mock-claude", max_tokens=1024, messages=HELLO) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) == 20
    assert final.content[0].text == "".join(pieces)  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == tokens("".join(pieces))
    assert final.usage.input_tokens == 4 + tokens("Hello, mock!")

    request = {"model": "mock-claude", "max_tokens": 8, "messages": HELLO, "stream": True}
    raw = httpx.post(f"{mock_url}/v1/messages", json=request).text
    names = [frame.split("\n")[0] for frame in raw.split("\n\n") if frame]
    deltas = names[3:-3]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert set(deltas) == {"event: content_block_delta"}
    assert names[-3:] == [
        "event: content_block_stop",
        "event: message_delta",
        "event: message_stop",
    ]


def test_it_calls_anthropic_tools(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="mock-claude", max_tokens=1024, messages=HELLO, tools=[CLAUDE_TOOL]
    )
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use"
    assert block.id.startswith("toolu_")
    assert block.name == "get_weather"
    assert block.input == WEATHER_ARGS

    with claude.messages.stream(
        model="mock-claude",
        max_tokens=1024,
        messages=HELLO,
        tools=[CLAUDE_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == WEATHER_ARGS  # type: ignore[union-attr]

    tool_result = {"type": "tool_result", "tool_use_id": block.id, "content": "Sunny"}
    conversation: Any = [
        *HELLO,
        {"role": "assistant", "content": [block.model_dump()]},
        {"role": "user", "content": [tool_result]},
    ]
    follow_up = claude.messages.create(
        model="mock-claude", max_tokens=1024, tools=[CLAUDE_TOOL], messages=conversation
    )
    assert follow_up.stop_reason == "end_turn"


def test_it_accounts_cache_creation_then_read(claude: anthropic.Anthropic) -> None:
    system: Any = [{"type": "text", "text": "s" * 4000, "cache_control": {"type": "ephemeral"}}]
    messages: Any = [{"role": "user", "content": "First question"}]
    first = claude.messages.create(
        model="mock-claude", max_tokens=100, system=system, messages=messages
    )
    assert first.usage.cache_creation_input_tokens == 1000
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.input_tokens == 4 + tokens("First question")

    second = claude.messages.create(
        model="mock-claude", max_tokens=100, system=system, messages=messages
    )
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.cache_read_input_tokens == 1000
    assert second.usage.input_tokens == 4 + tokens("First question")

    # Next turn, breakpoint on the newest block: the system prefix is read, the rest written.
    question = {"type": "text", "text": "q" * 400}
    messages += [
        {"role": "assistant", "content": "Answer"},
        {"role": "user", "content": [{**question, "cache_control": {"type": "ephemeral"}}]},
    ]
    third = claude.messages.create(
        model="mock-claude", max_tokens=100, system=system, messages=messages
    )
    turn_tokens = (4 + tokens("First question")) + (4 + tokens("Answer")) + (4 + 100)
    assert third.usage.cache_read_input_tokens == 1000
    assert third.usage.cache_creation_input_tokens == turn_tokens
    assert third.usage.input_tokens == 0

    # The breakpoint moves again; the previous turn's prefix is found by looking back.
    messages[-1] = {"role": "user", "content": [question]}
    messages += [
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "z" * 40, "cache_control": {"type": "ephemeral"}}],
        },
    ]
    fourth = claude.messages.create(
        model="mock-claude", max_tokens=100, system=system, messages=messages
    )
    assert fourth.usage.cache_read_input_tokens == 1000 + turn_tokens
    assert fourth.usage.cache_creation_input_tokens == (4 + 1) + (4 + 10)
    assert fourth.usage.input_tokens == 0

    # A different model never shares the cache.
    other = claude.messages.create(
        model="mock-claude-2", max_tokens=100, system=system, messages=messages[:1]
    )
    assert other.usage.cache_read_input_tokens == 0


def test_it_counts_anthropic_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="mock-claude", system="Be brief.", messages=HELLO)
    assert counted.input_tokens == tokens("Be brief.") + 4 + tokens("Hello, mock!")


def test_it_rejects_a_message_without_max_tokens(mock_url: str) -> None:
    response = httpx.post(f"{mock_url}/v1/messages", json={"model": "c", "messages": HELLO})
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_it_rejects_bad_json_in_each_dialect(mock_url: str) -> None:
    headers = {"content-type": "application/json"}
    openai_error = httpx.post(f"{mock_url}/v1/chat/completions", content=b"{nope", headers=headers)
    assert openai_error.status_code == 400
    assert set(openai_error.json()["error"]) == {"message", "type", "param", "code"}

    claude_error = httpx.post(f"{mock_url}/v1/messages", content=b"{nope", headers=headers)
    assert claude_error.status_code == 400
    assert claude_error.json()["error"]["type"] == "invalid_request_error"
    assert stats(mock_url)["total"] == 2


# ---- Controls --------------------------------------------------------------------------------


def test_it_injects_429_with_retry_after(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model="mock-gpt;status=429;retry_after=2", messages=HELLO)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert caught.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]

    with pytest.raises(openai.RateLimitError) as default_wait:
        oai.chat.completions.create(model="mock-gpt;status=429", messages=HELLO)
    assert default_wait.value.response.headers["retry-after"] == "1"

    with pytest.raises(anthropic.RateLimitError) as claude_caught:
        claude.messages.create(model="mock-claude;status=429", max_tokens=10, messages=HELLO)
    assert claude_caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]

    with pytest.raises(anthropic.OverloadedError):
        claude.messages.create(model="mock-claude;status=529", max_tokens=10, messages=HELLO)


def test_it_injects_500_from_model_name_or_header(oai: openai.OpenAI, mock_url: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        oai.chat.completions.create(model="mock-gpt;status=500", messages=HELLO)
    assert caught.value.body["type"] == "server_error"  # type: ignore[index]

    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(
            model="mock-gpt", messages=HELLO, extra_headers={"x-mock-status": "502"}
        )
    assert stats(mock_url)["by_model"] == {"mock-gpt;status=500": 1, "mock-gpt": 1}


def test_it_fails_exactly_one_in_ten_with_fail_rate(oai: openai.OpenAI) -> None:
    failed = []
    for attempt in range(1, 31):
        try:
            oai.chat.completions.create(model="mock-gpt;fail_rate=0.1", messages=HELLO)
        except openai.InternalServerError:
            failed.append(attempt)
    assert failed == [10, 20, 30]


def test_it_fails_the_first_requests_so_retries_succeed(mock_url: str, oai: openai.OpenAI) -> None:
    model = "mock-gpt;fail_first=2;retry_after=0.01"
    retrying = openai.OpenAI(base_url=f"{mock_url}/v1", api_key="x", max_retries=2)
    completion = retrying.chat.completions.create(model=model, messages=HELLO)
    assert completion.choices[0].message.content
    assert stats(mock_url)["by_model"][model] == 3

    other = "mock-gpt;fail_first=1"
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.create(model=other, messages=HELLO)
    assert caught.value.status_code == 503
    assert oai.chat.completions.create(model=other, messages=HELLO).choices


def test_it_hangs_until_the_client_times_out(mock_url: str) -> None:
    client = openai.OpenAI(base_url=f"{mock_url}/v1", api_key="x", max_retries=0, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="mock-gpt;timeout=1", messages=HELLO)
    assert 0.4 < time.monotonic() - started < 5
    # The server notices the disconnect and keeps serving.
    assert httpx.get(f"{mock_url}/health").json() == {"status": "ok"}


def test_it_drops_the_connection_mid_stream(oai: openai.OpenAI) -> None:
    received = []
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        stream = oai.chat.completions.create(
            model="mock-gpt;drop_after_chunks=3",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            received.append(chunk)
    content = [c for c in received if c.choices and c.choices[0].delta.content]
    assert len(content) == 3
    assert not any(c.choices and c.choices[0].finish_reason for c in received)
    assert not any(c.usage for c in received)


def test_it_drops_anthropic_streams_too(claude: anthropic.Anthropic) -> None:
    # anthropic ships its own httpx fork (httpx2), so match the transport error by message.
    with pytest.raises(Exception, match="incomplete chunked read"):  # noqa: SIM117
        with claude.messages.stream(
            model="mock-claude;drop_after_chunks=2", max_tokens=100, messages=HELLO
        ) as stream:
            stream.get_final_message()


def test_it_adds_latency(oai: openai.OpenAI) -> None:
    started = time.monotonic()
    oai.chat.completions.create(model="mock-gpt;latency_ms=300", messages=HELLO)
    assert time.monotonic() - started >= 0.3

    started = time.monotonic()
    chunks = list(
        oai.chat.completions.create(
            model="mock-gpt;chunks=3;chunk_delay_ms=60", messages=HELLO, stream=True
        )
    )
    assert len(chunks) == 5
    assert time.monotonic() - started >= 0.24


def test_it_shapes_usage_with_controls(
    oai: openai.OpenAI, claude: anthropic.Anthropic, mock_url: str
) -> None:
    exact = oai.chat.completions.create(model="mock-gpt;output_tokens=250", messages=HELLO)
    assert exact.usage is not None
    assert exact.usage.completion_tokens == 250
    assert tokens(exact.choices[0].message.content or "") == 250

    tiny = oai.chat.completions.create(model="mock-gpt;output_tokens=3", messages=HELLO)
    assert tiny.usage is not None
    assert tiny.usage.completion_tokens == 3

    overridden = oai.chat.completions.create(
        model="mock-gpt;cached_tokens=7;reasoning_tokens=9;output_tokens=20", messages=HELLO
    )
    usage = overridden.usage
    assert usage is not None
    assert usage.prompt_tokens_details.cached_tokens == 7  # type: ignore[union-attr]
    assert usage.completion_tokens_details.reasoning_tokens == 9  # type: ignore[union-attr]
    assert usage.completion_tokens == 20

    claude_exact = claude.messages.create(
        model="mock-claude;output_tokens=42", max_tokens=100, messages=HELLO
    )
    assert claude_exact.usage.output_tokens == 42

    chunks = list(
        oai.chat.completions.create(
            model="mock-gpt;no_usage=1",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_it_ignores_unknown_and_malformed_controls(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="mock-gpt;flavour=mint;latency_ms=soon", messages=HELLO
    )
    assert completion.model == "mock-gpt;flavour=mint;latency_ms=soon"


# ---- Ops endpoints ---------------------------------------------------------------------------


def test_it_counts_requests_and_resets(
    oai: openai.OpenAI, claude: anthropic.Anthropic, mock_url: str
) -> None:
    oai.chat.completions.create(model="mock-gpt", messages=HELLO)
    oai.chat.completions.create(model="mock-gpt", messages=HELLO)
    oai.embeddings.create(model="mock-embed", input="x")
    claude.messages.create(model="mock-claude", max_tokens=5, messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="mock-gpt;status=429", messages=HELLO)
    httpx.get(f"{mock_url}/health")

    assert stats(mock_url) == {
        "total": 5,
        "by_model": {"mock-gpt": 2, "mock-embed": 1, "mock-claude": 1, "mock-gpt;status=429": 1},
        "by_path": {"/v1/chat/completions": 3, "/v1/embeddings": 1, "/v1/messages": 1},
    }
    httpx.post(f"{mock_url}/_mock/reset").raise_for_status()
    assert stats(mock_url) == {"total": 0, "by_model": {}, "by_path": {}}


def test_it_reports_health(mock_url: str) -> None:
    response = httpx.get(f"{mock_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
