"""The failure taxonomy: what a provider failure means for the request and the client.

- `classify`: retry this model, leave for a context-window or content-policy fallback,
  skip a misconfigured deployment, or give up (the client's own mistake);
- `backoff`: how long to wait before retrying (the provider's Retry-After, or
  exponential with jitter);
- `client_error`: the GatewayError a client sees, with the right status and no
  provider internals.

Whether a failure opens a deployment's cooldown is decided by the caller from the
kind (`counts=kind != "client"`, gateway.breaker).
"""

from __future__ import annotations

import random
from typing import Literal

from core.errors import GatewayError
from gateway import upstream

MAX_BACKOFF_SECONDS = 8.0

Kind = Literal["retry", "context", "content_policy", "deployment", "client"]


def client_error(exc: upstream.UpstreamError) -> GatewayError:
    """What the client sees for a provider failure: the right status, no provider internals."""
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    if exc.kind == "timeout" or exc.status in (408, 504):
        return GatewayError(
            "The provider did not answer in time; retry, or use a smaller request.",
            504,
            "server_error",
            "upstream_timeout",
        )
    if exc.kind == "connection":
        return GatewayError(
            "Could not reach the provider; retry shortly.",
            502,
            "server_error",
            "upstream_connection_error",
        )
    if exc.status == 429:
        return GatewayError(
            f"The provider is rate-limiting this model: {exc.message}",
            503,
            "server_error",
            "upstream_rate_limited",
            headers=headers,
        )
    if exc.status in (400, 413, 422):
        return GatewayError(
            exc.message,
            400,
            "invalid_request_error",
            exc.provider_code or "upstream_rejected",
            exc.param,
        )
    if exc.status in (401, 403):
        return GatewayError(
            "The provider refused the gateway's credentials for this model; "
            "an admin needs to check the deployment's api_key.",
            502,
            "server_error",
            "upstream_auth_error",
        )
    if exc.status == 404:
        return GatewayError(
            "The provider does not know this deployment's model; an admin needs to check it.",
            502,
            "server_error",
            "upstream_model_not_found",
        )
    if exc.status in (503, 529):
        return GatewayError(
            f"The provider is overloaded or unavailable: {exc.message}",
            503,
            "server_error",
            "upstream_unavailable",
            headers=headers,
        )
    return GatewayError(
        f"The provider failed: {exc.message}",
        502,
        "server_error",
        "upstream_error",
        headers=headers,
    )


def no_deployment(model: str) -> GatewayError:
    return GatewayError(
        f"Every deployment of '{model}' is cooling down after failures or at its rate limit; "
        "retry shortly.",
        503,
        "server_error",
        "no_deployment_available",
        headers={"retry-after": "1"},
    )


_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "maximum context",
    "too many tokens",
    "prompt is too long",
)
_POLICY_HINTS = ("content_policy", "content policy", "content_filter", "safety system")


def classify(exc: upstream.UpstreamError) -> Kind:
    """retry | context | content_policy | deployment | client."""
    if exc.kind in ("timeout", "connection") or exc.status in (408, 429, 500, 502, 503, 504, 529):
        return "retry"
    text = f"{exc.provider_code or ''} {exc.message}".lower()
    if exc.status == 400 and any(hint in text for hint in _CONTEXT_HINTS):
        return "context"
    if exc.status == 400 and any(hint in text for hint in _POLICY_HINTS):
        return "content_policy"
    if exc.status in (401, 403, 404):
        return "deployment"  # our configuration's problem: try the next model, not this one again
    return "client"


def backoff(retry: int, exc: upstream.UpstreamError, base: float, cap: float) -> float | None:
    """Seconds to wait before retry number `retry` (0-based); None: don't wait, fall back."""
    if exc.retry_after is not None:
        # A hair past the provider's time: the deployment's cooldown (opened for
        # exactly Retry-After) must have ended when the retry picks again.
        return exc.retry_after + 0.05 if exc.retry_after <= cap else None
    # Exponential with full jitter around the nominal delay.
    return min(MAX_BACKOFF_SECONDS, base * (2.0**retry)) * random.uniform(0.5, 1.5)  # noqa: S311
