"""Helpers shared by the gateway's end-to-end tests: error shapes, SSE parsing and cost maths."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

ERROR_FIELDS = {"message", "type", "param", "code"}
_UNSET: Any = object()


def assert_openai_error(
    response: httpx.Response,
    status: int,
    *,
    code: str | None = _UNSET,
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


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def expected_cost_micro_usd(
    prompt_tokens: int,
    completion_tokens: int,
    input_per_million: Decimal,
    output_per_million: Decimal,
) -> int:
    """USD per 1M tokens is micro-USD per token; the total is rounded UP to a micro-dollar."""
    exact = prompt_tokens * input_per_million + completion_tokens * output_per_million
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def usd_header_to_micro(value: str) -> int:
    """ "0.000060" → 60; refuses anything that is not a plain decimal string."""
    assert value and "e" not in value.lower(), value
    amount = Decimal(value) * 1_000_000
    assert amount == amount.to_integral_value(), f"{value} is not a whole number of micro-USD"
    return int(amount)


def micro_to_usd_str(micro: int) -> str:
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


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


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until `check()` became true; raises AssertionError after `timeout`."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def chat(gateway_v1: str, secret: str | None, body: Any, **kwargs: Any) -> httpx.Response:
    """POST /v1/chat/completions with raw httpx (for what the SDK would not send)."""
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
