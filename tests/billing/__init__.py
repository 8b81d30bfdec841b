"""Tests of the money core: prices, periods, budgets, rate limits, spend and alerts.

Helpers shared by the end-to-end modules live here.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
from openai import APIStatusError, OpenAI
from openai.types.chat import ChatCompletionMessageParam

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
ISO_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def sdk(live_gateway: Any, secret: str) -> OpenAI:
    # No retries: the SDK would otherwise retry a 429 and hide the refusal.
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


def output_priced_model(
    make_model: Any, *, output_tokens: int, output: str = "1", controls: str = "", **fields: Any
) -> Any:
    """A model whose prompt is free and whose every completion is `output_tokens` long.

    With free input, what admission reserves is exactly max_tokens * the output price, and
    a request costs exactly output_tokens * the output price: budgets can be tested to the
    micro-dollar without depending on how anyone counts prompt tokens. `controls` adds
    more of the mock's `;name=value` controls, e.g. ";status=400".
    """
    name = unique("m")
    fields.setdefault("input_cost_per_million", Decimal("0"))
    fields.setdefault("output_cost_per_million", Decimal(output))
    return make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens={output_tokens}{controls}",
        **fields,
    )


def body(exc: APIStatusError) -> dict[str, Any]:
    """The `error` object of an error the SDK raised (the SDK unwraps `{"error": ...}`)."""
    assert isinstance(exc.body, dict), exc.body
    return dict(exc.body)


def upstream_name(model: Any) -> str:
    """The model string the mock upstream counts calls under."""
    return str(model.provider_model).removeprefix("openai/")


def usd(value: str) -> int:
    """ "0.000450" → 450 micro-USD; refuses anything but a plain six-place decimal string."""
    assert re.fullmatch(r"-?\d+\.\d{6}", value), value
    return int(Decimal(value) * 1_000_000)


def usd_str(micro: int) -> str:
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


def iso_instants(text: str) -> list[datetime]:
    return [datetime.fromisoformat(m.replace("Z", "+00:00")) for m in ISO_INSTANT.findall(text)]


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error response with that status."""
    assert response.status_code == status, (response.status_code, response.text[:1000])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


def fresh_minute(margin: float = 6.0) -> None:
    """Wait for the next minute if this one ends within `margin` seconds.

    Rate limits count in fixed one-minute windows of the wall clock; a test that makes
    a few requests must not straddle two windows.
    """
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)
