"""Unit tests of the failure taxonomy: how a provider's failure becomes the client's error.

Two steps, both pure: `upstream.from_litellm` turns what litellm raised into an
`UpstreamError` (the provider's status, retry-after and a message without secrets), and
`proxy.client_error` turns that into the `GatewayError` the client sees. Which failures
are retried or fall back (`proxy._kind`) and how long a retry waits (`proxy._backoff`)
are private to the request flow; the live tests in test_fallbacks_e2e.py prove them.
"""

from __future__ import annotations

import httpx
import litellm
import pytest

from core.errors import GatewayError
from gateway.failures import MAX_BACKOFF_SECONDS, backoff, classify, client_error
from gateway.upstream import UpstreamError, from_litellm, sanitise


def _response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://p"))


# --- litellm's exceptions → UpstreamError ------------------------------------------------------


def test_it_keeps_the_providers_status_and_retry_after_of_a_rate_limit() -> None:
    exc = litellm.RateLimitError(
        "slow down",
        llm_provider="openai",
        model="m",
        response=_response(429, **{"retry-after": "7"}),
    )

    error = from_litellm(exc)

    assert (error.status, error.kind, error.retry_after) == (429, "http", 7.0)
    assert error.message == "slow down"


def test_it_prefers_retry_after_ms() -> None:
    headers = {"retry-after-ms": "1500", "retry-after": "9"}
    exc = litellm.RateLimitError(
        "x", llm_provider="openai", model="m", response=_response(429, **headers)
    )

    assert from_litellm(exc).retry_after == 1.5


def test_it_calls_a_litellm_timeout_a_timeout() -> None:
    error = from_litellm(litellm.Timeout("t", model="m", llm_provider="openai"), partial=True)

    assert (error.status, error.kind, error.partial) == (504, "timeout", True)


def test_it_calls_a_litellm_connection_error_a_connection_failure() -> None:
    error = from_litellm(litellm.APIConnectionError("refused", llm_provider="openai", model="m"))

    assert (error.status, error.kind) == (502, "connection")


def test_it_names_the_first_unsupported_parameter() -> None:
    exc = litellm.UnsupportedParamsError(
        message="openai does not support parameters: ['logit_bias', 'seed'], for model=x",
        llm_provider="openai",
        model="x",
    )

    error = from_litellm(exc)

    assert (error.status, error.param, error.provider_code) == (
        400,
        "logit_bias",
        "unsupported_parameter",
    )
    assert error.message.startswith("This model does not support 'logit_bias', 'seed';")


def test_it_blames_the_request_when_litellm_cannot_translate_it() -> None:
    error = from_litellm(ValueError("tool_choice must be a dict"))

    assert (error.status, error.provider_code) == (400, "untranslatable_request")
    assert error.message == (
        "The request cannot be translated for this model: tool_choice must be a dict"
    )


def test_it_strips_litellms_prefix_and_any_secret_from_the_message() -> None:
    exc = litellm.AuthenticationError(
        "Incorrect API key sk-abcdefghijklmnop0123 at https://api.openai.com/v1",
        llm_provider="openai",
        model="m",
    )

    error = from_litellm(exc)

    assert error.status == 401
    assert error.message == "Incorrect API key [redacted] at [redacted]"


def test_sanitise_redacts_addresses_and_bearer_tokens_and_caps_the_length() -> None:
    assert sanitise("from 10.0.0.7:8080 with Bearer abc.def") == "from [redacted] with [redacted]"
    assert sanitise("") == "The provider returned an error."
    assert sanitise("x" * 500) == "x" * 400


# --- UpstreamError → what the client sees -------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "type_", "code"),
    [
        (UpstreamError(504, "t", "timeout"), 504, "server_error", "upstream_timeout"),
        (UpstreamError(408, "t"), 504, "server_error", "upstream_timeout"),
        (UpstreamError(502, "c", "connection"), 502, "server_error", "upstream_connection_error"),
        (UpstreamError(429, "slow"), 503, "server_error", "upstream_rate_limited"),
        (UpstreamError(400, "bad"), 400, "invalid_request_error", "upstream_rejected"),
        (UpstreamError(413, "big"), 400, "invalid_request_error", "upstream_rejected"),
        (UpstreamError(422, "odd"), 400, "invalid_request_error", "upstream_rejected"),
        (UpstreamError(401, "key"), 502, "server_error", "upstream_auth_error"),
        (UpstreamError(403, "key"), 502, "server_error", "upstream_auth_error"),
        (UpstreamError(404, "gone"), 502, "server_error", "upstream_model_not_found"),
        (UpstreamError(503, "busy"), 503, "server_error", "upstream_unavailable"),
        (UpstreamError(529, "busy"), 503, "server_error", "upstream_unavailable"),
        (UpstreamError(500, "boom"), 502, "server_error", "upstream_error"),
    ],
)
def test_it_maps_each_provider_failure_to_one_status_and_code(
    failure: UpstreamError, status: int, type_: str, code: str
) -> None:
    error = client_error(failure)

    assert isinstance(error, GatewayError)
    assert (error.status, error.type, error.code) == (status, type_, code)


def test_it_passes_the_providers_own_code_and_param_through_on_a_client_error() -> None:
    failure = UpstreamError(400, "max_tokens is too large", param="max_tokens", provider_code="x")

    error = client_error(failure)

    assert (error.message, error.code, error.param) == (
        "max_tokens is too large",
        "x",
        "max_tokens",
    )


def test_it_never_leaks_the_providers_message_for_a_credential_failure() -> None:
    error = client_error(UpstreamError(401, "Invalid key for org-secret"))

    assert "org-secret" not in error.message
    assert error.message == (
        "The provider refused the gateway's credentials for this model; "
        "an admin needs to check the deployment's api_key."
    )


def test_it_rounds_retry_after_to_whole_seconds_and_never_below_one() -> None:
    assert client_error(UpstreamError(429, "x", retry_after=2.6)).headers == {"retry-after": "3"}
    assert client_error(UpstreamError(503, "x", retry_after=0.2)).headers == {"retry-after": "1"}
    assert client_error(UpstreamError(429, "x")).headers == {}


# --- what the flow does with a failure: retry, fall back by kind, or answer ---------------------


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (UpstreamError(429, "slow down"), "retry"),
        (UpstreamError(529, "overloaded"), "retry"),
        (UpstreamError(599, "no answer", kind="timeout"), "retry"),
        (UpstreamError(400, "x", kind="connection"), "retry"),
        (UpstreamError(400, "This model's maximum context length is 8192 tokens"), "context"),
        (UpstreamError(400, "Prompt is too long"), "context"),
        (UpstreamError(400, "flagged", provider_code="content_policy_violation"), "content_policy"),
        (UpstreamError(401, "bad key"), "deployment"),
        (UpstreamError(404, "no such model"), "deployment"),
        (UpstreamError(400, "temperature must be at most 2"), "client"),
        (UpstreamError(422, "maximum context length"), "client"),  # only a 400 says context
    ],
)
def test_it_classifies_each_failure_into_what_the_flow_does_next(
    failure: UpstreamError, kind: str
) -> None:
    assert classify(failure) == kind


def test_it_waits_just_past_the_providers_retry_after_when_it_is_within_the_cap() -> None:
    assert backoff(0, UpstreamError(429, "x", retry_after=2.0), 0.5, 10.0) == pytest.approx(2.05)
    # Longer than the group allows: no wait, fall back at once.
    assert backoff(0, UpstreamError(429, "x", retry_after=30.0), 0.5, 10.0) is None


def test_it_backs_off_exponentially_with_jitter_and_a_ceiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random

    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the top of the jitter
    failure = UpstreamError(503, "x")
    assert [backoff(n, failure, 0.5, 10.0) for n in range(3)] == [0.75, 1.5, 3.0]
    assert backoff(10, failure, 0.5, 10.0) == MAX_BACKOFF_SECONDS * 1.5
    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert backoff(1, failure, 0.5, 10.0) == 0.5
