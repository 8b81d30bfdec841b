"""Streamed chat completions: SSE exactly as OpenAI sends it, through raw HTTP and both SDKs."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from tests.support.http import content_of, sse_chunks, unique, usage_of

pytestmark = pytest.mark.e2e

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello stream"}]

LOOKUP_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string"},
                "include_items": {"type": "boolean"},
                "quantity": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["order_id"],
        },
    },
}


def stream_raw(live_gateway, secret: str, body: dict) -> httpx.Response:
    response = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    return response


def streamed_text(chunks: list[dict]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        for choice in chunk["choices"]
        if choice.get("delta")
    )


def test_it_streams_sse_ending_in_done_with_a_usage_chunk_when_asked(
    live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()

    response = stream_raw(
        live_gateway,
        issued.secret,
        {
            "model": model.name,
            "messages": HELLO,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    assert response.headers["x-gateway-request-id"]
    assert model.name in response.headers["x-gateway-model"]
    assert response.text.rstrip("\n").endswith("data: [DONE]")
    chunks, done = sse_chunks(response.text)
    assert done
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    usage_chunks = [chunk for chunk in chunks if chunk.get("usage")]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1], "the usage chunk is the last one before [DONE]"
    assert usage_chunks[0]["choices"] == []
    usage = usage_chunks[0]["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert [c["finish_reason"] for c in chunks[-2]["choices"]] == ["stop"]
    assert streamed_text(chunks).startswith("Mock reply to: Hello stream")


def test_it_sends_no_usage_chunk_when_the_client_did_not_ask(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    response = stream_raw(
        live_gateway, issued.secret, {"model": model.name, "messages": HELLO, "stream": True}
    )

    assert response.status_code == 200, response.text
    chunks, done = sse_chunks(response.text)
    assert done
    assert chunks
    assert all(chunk["choices"] for chunk in chunks), "no chunk may have an empty choices list"
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert streamed_text(chunks).startswith("Mock reply to: Hello stream")


def test_it_streams_the_same_text_as_the_json_answer(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    plain = client.chat.completions.create(model=model.name, messages=HELLO)
    streamed = client.chat.completions.create(
        model=model.name, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    pieces = []
    usage = None
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage

    assert len(pieces) > 1
    assert "".join(pieces) == content_of(plain)
    assert usage is not None
    assert usage.prompt_tokens == usage_of(plain).prompt_tokens
    assert usage.completion_tokens == usage_of(plain).completion_tokens


def test_it_streams_to_the_async_sdk(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    async def run() -> tuple[str, CompletionUsage | None, int]:
        client = AsyncOpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model=model.name,
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage, count = "", None, 0
            async for chunk in stream:
                count += 1
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if chunk.usage is not None:
                    usage = chunk.usage
            return text, usage, count
        finally:
            await client.close()

    text, usage, count = asyncio.run(run())

    assert count > 2
    assert text.startswith("Mock reply to: Hello stream")
    assert usage is not None and usage.completion_tokens > 0


def test_it_streams_tool_call_fragments_that_reassemble_to_valid_json(
    live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    stream = client.chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "Where is order 7?"}],
        tools=[LOOKUP_TOOL],
        stream=True,
    )
    names: list[str] = []
    fragments: list[str] = []
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    fragments.append(call.function.arguments)
            finish = choice.finish_reason or finish

    assert names == ["lookup_order"]
    assert len(fragments) > 1, "arguments arrive in several fragments"
    assert json.loads("".join(fragments)) == {
        "order_id": "mock",
        "include_items": True,
        "quantity": 1,
        "tags": ["mock"],
    }
    assert finish == "tool_calls"


def test_it_does_not_end_a_stream_the_provider_cut_off_with_done(
    live_gateway, make_model, make_key, mock_upstream
):
    name = unique("cut")
    model = make_model(name=name, provider_model=f"openai/{name};drop_after_chunks=3")
    issued = make_key()

    with httpx.stream(
        "POST",
        f"{live_gateway.v1}/chat/completions",
        json={"model": model.name, "messages": HELLO, "stream": True},
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    ) as response:
        status = response.status_code
        text = response.read().decode()

    assert mock_upstream.calls(f"{name};drop_after_chunks=3") == 1
    # Either refused before the stream began, or a stream whose end says it failed:
    # a truncated answer must never look like a complete one.
    if status == 200:
        chunks, done = sse_chunks(text)
        assert not done, "a cut-off stream must not end with [DONE]"
        assert "error" in chunks[-1], chunks[-1]
        assert set(chunks[-1]["error"]) >= {"message", "type", "code"}
    else:
        assert status >= 500
