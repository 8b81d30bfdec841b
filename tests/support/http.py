"""Driving `/v1` as a client would (SDKs, raw posts, SSE) and checking what comes back."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
from openai import APIStatusError, OpenAI
from openai.types import CompletionUsage
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
ERROR_FIELDS = {"message", "type", "param", "code"}
_UNSET: Any = object()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- clients ----------------------------------------------------------------------------------


def openai_sdk(live_gateway: Any, secret: str) -> OpenAI:
    # No retries: the SDK would otherwise retry 429/5xx and hide what the gateway did.
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


def anthropic_sdk(live_gateway: Any, secret: str) -> anthropic.Anthropic:
    # The SDK appends /v1/messages itself and authenticates with `x-api-key`.
    return anthropic.Anthropic(base_url=live_gateway.url, api_key=secret, max_retries=0)


def post(
    live_gateway: Any,
    secret: str | None,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> httpx.Response:
    """A raw POST to /v1/<path> with a Bearer key (for what an SDK would not send)."""
    sent = dict(headers or {})
    if secret is not None:
        sent.setdefault("authorization", f"Bearer {secret}")
    return httpx.post(f"{live_gateway.v1}/{path}", json=body, headers=sent, timeout=timeout)


def chat(gateway_v1: str, secret: str | None, body: Any, **kwargs: Any) -> httpx.Response:
    """POST /v1/chat/completions with raw httpx; `body` may be bytes or str sent as is."""
    headers = dict(kwargs.pop("headers", {}) or {})
    if secret is not None:
        headers.setdefault("authorization", f"Bearer {secret}")
    if isinstance(body, bytes | str):
        headers.setdefault("content-type", "application/json")
        return httpx.post(
            f"{gateway_v1}/chat/completions", content=body, headers=headers, timeout=30, **kwargs
        )
    return httpx.post(
        f"{gateway_v1}/chat/completions", json=body, headers=headers, timeout=30, **kwargs
    )


def chat_body(model: str, text: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# --- errors -----------------------------------------------------------------------------------


def assert_openai_error(
    response: httpx.Response,
    status: int,
    code: str | None = _UNSET,
    *,
    type: str | None = _UNSET,
    param: str | None = _UNSET,
) -> dict[str, Any]:
    """The response is a JSON error in OpenAI's shape; returns its `error` object."""
    assert response.status_code == status, (response.status_code, response.text[:2000])
    assert response.headers.get("content-type", "").startswith("application/json"), (
        response.headers.get("content-type"),
        response.text[:500],
    )
    text = response.text
    assert "Traceback" not in text
    assert "<html" not in text.lower()
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert response.headers.get("x-request-id"), dict(response.headers)
    if code is not _UNSET:
        assert error["code"] == code, error
    if type is not _UNSET:
        assert error["type"] == type, error
    if param is not _UNSET:
        assert error["param"] == param, error
    return dict(error)


def sdk_error_body(exc: APIStatusError) -> dict[str, Any]:
    """The `error` object of an error the SDK raised (the SDK unwraps `{"error": ...}`)."""
    assert isinstance(exc.body, dict), exc.body
    return dict(exc.body)


def openai_error_shape(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"error"}
        and isinstance(body["error"], dict)
        and set(body["error"]) == ERROR_FIELDS
        and isinstance(body["error"]["message"], str)
        and bool(body["error"]["message"])
        and isinstance(body["error"]["type"], str)
    )


def anthropic_error_shape(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"type", "error"}
        and body["type"] == "error"
        and isinstance(body["error"], dict)
        and set(body["error"]) == {"type", "message"}
        and isinstance(body["error"]["message"], str)
        and bool(body["error"]["message"])
    )


def check_each(cases: list[Any], check: Callable[[Any], None]) -> None:
    """Run `check` on every case and report every failing case, not only the first.

    Used for matrices of small HTTP checks, where one test per case would mostly
    measure database flushes between tests.
    """
    failures = []
    for case in cases:
        try:
            check(case)
        except AssertionError as exc:
            failures.append(f"{case!r}: {str(exc)[:600]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


# --- streams ----------------------------------------------------------------------------------


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comment lines are ignored)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data_lines = [
            line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")
        ]
        if data_lines:
            events.append("\n".join(data_lines))
    return events


def sse_chunks(text: str) -> tuple[list[dict[str, Any]], bool]:
    """(the JSON chunks, whether the stream ended with `data: [DONE]`)."""
    events = sse_events(text)
    done = bool(events) and events[-1] == "[DONE]"
    assert events.count("[DONE]") <= 1, events[-3:]
    chunks = [json.loads(event) for event in events if event != "[DONE]"]
    return chunks, done


# --- narrowing SDK objects (they type every field as optional) --------------------------------


def content_of(completion: ChatCompletion) -> str:
    content = completion.choices[0].message.content
    assert content is not None, completion
    return content


def usage_of(completion: ChatCompletion) -> CompletionUsage:
    usage = completion.usage
    assert usage is not None, completion
    return usage


def first_tool_call(completion: ChatCompletion) -> ChatCompletionMessageFunctionToolCall:
    calls = completion.choices[0].message.tool_calls
    assert calls, completion
    call = calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall), call
    return call
