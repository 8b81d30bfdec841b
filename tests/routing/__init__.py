"""End-to-end tests of one host serving both dialects, and of resilient routing.

Anthropic's Messages API and OpenAI's Responses and legacy completions APIs through the
official SDKs; aliases and model groups through the management API; routing strategies,
per-deployment limits, fallbacks, retries, cooldowns and the response cache, all against
the live gateway and the mock upstream. Helpers shared by the modules live here.
"""

from __future__ import annotations

import time
import uuid
from decimal import ROUND_CEILING, Decimal
from typing import Any

import anthropic
import httpx
from openai import OpenAI

# The model string an Anthropic-dialect deployment sends upstream (plus its controls).
CLAUDE = "claude-3-5-haiku-20241022"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def openai_sdk(live_gateway: Any, secret: str) -> OpenAI:
    # No retries: the SDK would otherwise retry 429/5xx and hide what the gateway did.
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


def anthropic_sdk(live_gateway: Any, secret: str) -> anthropic.Anthropic:
    # The SDK appends /v1/messages itself and authenticates with `x-api-key`.
    return anthropic.Anthropic(base_url=live_gateway.url, api_key=secret, max_retries=0)


def openai_deployment(
    make_model: Any, name: str | None = None, controls: str = "", **fields: Any
) -> Any:
    """An OpenAI-dialect deployment on the mock; `controls` like ";status=500".

    The upstream model string is unique (so the mock's per-model counts belong to this
    test) even when several deployments share one public `name`.
    """
    name = name or unique("m")
    upstream = f"{unique(name)}{controls}"
    return make_model(name=name, provider_model=f"openai/{upstream}", **fields)


def anthropic_deployment(
    make_model: Any, mock_upstream: Any, name: str | None = None, controls: str = "", **fields: Any
) -> Any:
    """An Anthropic-dialect deployment on the mock (the gateway appends /v1/messages).

    `;id=…` is a control the mock ignores: it only makes the model string unique.
    """
    name = name or unique("claude")
    fields.setdefault("api_base", mock_upstream.url)
    provider_model = f"anthropic/{CLAUDE};id={uuid.uuid4().hex[:12]}{controls}"
    return make_model(name=name, provider_model=provider_model, **fields)


def upstream_name(deployment: Any) -> str:
    """The model string the mock upstream counts calls under (provider prefix removed)."""
    return str(deployment.provider_model).split("/", 1)[1]


def ledger(request_id: str) -> list[Any]:
    """The request's ledger rows in attempt order."""
    from billing.models import LedgerEntry

    return list(LedgerEntry.objects.filter(request_id=request_id).order_by("attempt"))


def cost_micro_usd(
    *,
    input_tokens: int,
    output_tokens: int,
    prices: tuple[str, str],
    reads: int = 0,
    writes: int = 0,
    cache_prices: tuple[str, str] = ("0", "0"),
) -> int:
    """Micro-USD for the usage at USD-per-1M prices, rounded up; input excludes cache tokens."""
    price_in, price_out = (Decimal(p) for p in prices)
    price_read, price_write = (Decimal(p) for p in cache_prices)
    exact = (
        input_tokens * price_in
        + reads * price_read
        + writes * price_write
        + output_tokens * price_out
    )
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def usd_micro(value: str) -> int:
    """ "0.000060" → 60; only plain decimals with six places."""
    whole, _, frac = value.partition(".")
    assert whole.isdigit() and len(frac) == 6 and frac.isdigit(), value
    return int(whole) * 1_000_000 + int(frac)


def put_group(live_gateway: Any, name: str, **policy: Any) -> dict[str, Any]:
    """Set a model's routing policy through the management API."""
    with live_gateway.admin() as admin:
        response = admin.put(f"/model-groups/{name}", json=policy)
    assert response.status_code == 200, response.text
    return dict(response.json())


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


def chat_body(model: str, text: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:1000])
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    return dict(body["error"])


def fresh_minute(margin: float = 8.0) -> None:
    """Wait for the next minute if this one ends within `margin` seconds.

    Per-deployment rpm limits count in fixed one-minute windows of the wall clock; a
    test that counts requests against one must not straddle two windows.
    """
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def ledger_for_model(model: str) -> list[Any]:
    """Every ledger row of a (test-unique) public model name, oldest first."""
    from billing.models import LedgerEntry

    return list(LedgerEntry.objects.filter(model=model).order_by("id"))
