"""Fallbacks, retries, backoff, Retry-After, context-window fallbacks and cooldowns.

Every attempt that reached a provider has exactly one ledger row, in attempt order; the
response says which deployment answered (`x-gateway-model`) after how many attempts
(`x-gateway-attempts`).
"""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import pytest

from tests.support.http import (
    anthropic_sdk,
    assert_openai_error,
    chat_body,
    openai_sdk,
    post,
    unique,
)
from tests.support.models import anthropic_deployment, openai_deployment, put_group
from tests.support.money import ledger, upstream_name

pytestmark = pytest.mark.e2e

# Policies for fast tests: no waiting between retries unless a test asks for it.
NO_RETRIES = {"num_retries": 0, "retry_backoff_seconds": 0}


def attempts_of(request_id: str) -> list[tuple[int, str, str, int | None]]:
    return [
        (row.attempt, row.status, row.provider_model, row.http_status) for row in ledger(request_id)
    ]


def assert_costed_once(request_id: str) -> None:
    """Error attempts cost nothing; the one successful attempt costs something."""
    rows = ledger(request_id)
    assert [row.attempt for row in rows] == list(range(1, len(rows) + 1)), rows
    for row in rows:
        if row.status == "success":
            assert row.charged_cost_micro_usd > 0, row
        else:
            assert row.charged_cost_micro_usd == 0, row


def test_it_falls_back_in_order_across_dialects(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    first = openai_deployment(make_model, controls=";status=500")
    second = anthropic_deployment(make_model, mock_upstream, controls=";status=503")
    third = openai_deployment(make_model)
    put_group(live_gateway, first.name, fallbacks=[second.name, third.name], **NO_RETRIES)
    put_group(live_gateway, second.name, **NO_RETRIES)
    alice = make_key()

    raw = openai_sdk(live_gateway, alice.secret).chat.completions.with_raw_response.create(
        model=first.name, messages=[{"role": "user", "content": "Who answers?"}]
    )

    assert raw.parse().choices[0].message.content
    assert raw.headers["x-gateway-model"] == third.provider_model
    assert raw.headers["x-gateway-attempts"] == "3"
    request_id = raw.headers["x-request-id"]
    assert attempts_of(request_id) == [
        (1, "error", first.provider_model, 500),
        (2, "error", second.provider_model, 503),
        (3, "success", third.provider_model, 200),
    ]
    assert {row.model for row in ledger(request_id)} == {first.name}
    assert_costed_once(request_id)
    for deployment in (first, second, third):
        assert mock_upstream.calls(upstream_name(deployment)) == 1


def test_it_falls_back_from_an_anthropic_deployment_on_the_messages_api(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    claude = anthropic_deployment(make_model, mock_upstream, controls=";status=529")
    backup = openai_deployment(make_model)
    put_group(live_gateway, claude.name, fallbacks=[backup.name], **NO_RETRIES)
    alice = make_key()

    raw = anthropic_sdk(live_gateway, alice.secret).messages.with_raw_response.create(
        model=claude.name, max_tokens=100, messages=[{"role": "user", "content": "Anyone?"}]
    )

    assert raw.parse().content
    assert raw.headers["x-gateway-model"] == backup.provider_model
    assert raw.headers["x-gateway-attempts"] == "2"
    assert attempts_of(raw.headers["x-request-id"]) == [
        (1, "error", claude.provider_model, 529),
        (2, "success", backup.provider_model, 200),
    ]
    assert_costed_once(raw.headers["x-request-id"])


def test_it_retries_with_backoff_then_gives_up(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    broken = openai_deployment(make_model, controls=";status=500")
    put_group(
        live_gateway, broken.name, num_retries=2, retry_backoff_seconds=0.2, allowed_fails=100
    )
    alice = make_key()

    started = time.monotonic()
    response = post(live_gateway, alice.secret, "chat/completions", chat_body(broken.name))
    elapsed = time.monotonic() - started

    assert_openai_error(response, 502, "upstream_error")
    assert mock_upstream.calls(upstream_name(broken)) == 3
    request_id = response.headers["x-request-id"]
    assert attempts_of(request_id) == [
        (attempt, "error", broken.provider_model, 500) for attempt in (1, 2, 3)
    ]
    assert_costed_once(request_id)
    # Backoff 0.2 s then 0.4 s, each jittered by x0.5 to x1.5: at least 0.3 s in all.
    assert 0.25 <= elapsed < 3.0, elapsed


def test_it_honours_retry_after(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    alice = make_key()
    # A few times over: waiting out a Retry-After must lead to the retry every time.
    for _ in range(3):
        limited = openai_deployment(make_model, controls=";fail_first=1;status=429;retry_after=1")
        put_group(live_gateway, limited.name, num_retries=1, retry_backoff_seconds=0)

        started = time.monotonic()
        response = post(live_gateway, alice.secret, "chat/completions", chat_body(limited.name))
        elapsed = time.monotonic() - started

        assert response.status_code == 200, (
            response.text,
            elapsed,
            mock_upstream.calls(upstream_name(limited)),
        )
        assert response.headers["x-gateway-attempts"] == "2"
        # The backoff alone would be 0 s: the wait is the provider's Retry-After.
        assert 1.0 <= elapsed < 4.0, elapsed
        assert mock_upstream.calls(upstream_name(limited)) == 2
        assert attempts_of(response.headers["x-request-id"]) == [
            (1, "error", limited.provider_model, 429),
            (2, "success", limited.provider_model, 200),
        ]
        assert_costed_once(response.headers["x-request-id"])


def test_it_does_not_retry_a_bad_request(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    picky = openai_deployment(make_model, controls=";status=400")
    backup = openai_deployment(make_model)
    put_group(live_gateway, picky.name, num_retries=2, fallbacks=[backup.name])
    alice = make_key()

    response = post(live_gateway, alice.secret, "chat/completions", chat_body(picky.name))

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    # The provider's own message, so the client knows what to change.
    assert "Mock upstream injected HTTP 400" in error["message"], error
    assert mock_upstream.calls(upstream_name(picky)) == 1
    # The client's request is at fault: another model would refuse it too.
    assert mock_upstream.calls(upstream_name(backup)) == 0
    assert attempts_of(response.headers["x-request-id"]) == [
        (1, "error", picky.provider_model, 400)
    ]


def test_it_does_not_retry_a_credentials_failure_but_falls_back(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    refused = openai_deployment(make_model, controls=";status=401")
    lonely = openai_deployment(make_model, controls=";status=401")
    backup = openai_deployment(make_model)
    put_group(live_gateway, refused.name, num_retries=2, fallbacks=[backup.name])
    put_group(live_gateway, lonely.name, num_retries=2)
    alice = make_key()

    answered = post(live_gateway, alice.secret, "chat/completions", chat_body(refused.name))
    failed = post(live_gateway, alice.secret, "chat/completions", chat_body(lonely.name))

    assert answered.status_code == 200, answered.text
    assert answered.headers["x-gateway-model"] == backup.provider_model
    assert mock_upstream.calls(upstream_name(refused)) == 1
    assert attempts_of(answered.headers["x-request-id"]) == [
        (1, "error", refused.provider_model, 401),
        (2, "success", backup.provider_model, 200),
    ]
    assert_openai_error(failed, 502, "upstream_auth_error")
    assert mock_upstream.calls(upstream_name(lonely)) == 1


def test_it_serves_a_long_prompt_from_the_context_window_fallback(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    small = openai_deployment(make_model, context_length=200)
    bigger = openai_deployment(make_model, context_length=100_000)
    unconfigured = openai_deployment(make_model, context_length=200)
    put_group(live_gateway, small.name, context_window_fallbacks=[bigger.name])
    alice = make_key()
    long_text = "Please read this carefully. " * 200  # far more than 200 tokens

    short = post(live_gateway, alice.secret, "chat/completions", chat_body(small.name, "Hi"))
    long = post(live_gateway, alice.secret, "chat/completions", chat_body(small.name, long_text))
    too_long = post(
        live_gateway, alice.secret, "chat/completions", chat_body(unconfigured.name, long_text)
    )

    assert short.headers["x-gateway-model"] == small.provider_model
    assert long.status_code == 200, long.text
    assert long.headers["x-gateway-model"] == bigger.provider_model
    # The small model was never asked: the gateway knew the prompt would not fit.
    assert mock_upstream.calls(upstream_name(small)) == 1
    assert mock_upstream.calls(upstream_name(bigger)) == 1
    assert attempts_of(long.headers["x-request-id"]) == [(1, "success", bigger.provider_model, 200)]
    assert_openai_error(too_long, 400, "context_length_exceeded")
    assert mock_upstream.calls(upstream_name(unconfigured)) == 0


def test_it_takes_the_fallbacks_of_the_request(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    broken = openai_deployment(make_model, controls=";status=500")
    configured = openai_deployment(make_model)
    chosen = openai_deployment(make_model)
    put_group(live_gateway, broken.name, fallbacks=[configured.name], **NO_RETRIES)
    alice = make_key()

    litellm_style = post(
        live_gateway,
        alice.secret,
        "chat/completions",
        chat_body(broken.name, fallbacks=[chosen.name]),
    )
    openrouter_style = post(
        live_gateway,
        alice.secret,
        "chat/completions",
        {**chat_body(broken.name), "models": [broken.name, chosen.name]},
    )

    # OpenRouter's form may leave out `model`: the first of `models` is the one requested.
    models_only = post(
        live_gateway,
        alice.secret,
        "chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "models": [broken.name, chosen.name]},
    )

    for response in (litellm_style, openrouter_style, models_only):
        assert response.status_code == 200, response.text
        assert response.headers["x-gateway-model"] == chosen.provider_model
        assert attempts_of(response.headers["x-request-id"]) == [
            (1, "error", broken.provider_model, 500),
            (2, "success", chosen.provider_model, 200),
        ]
    # The request's list replaced the configured one.
    assert mock_upstream.calls(upstream_name(configured)) == 0
    assert mock_upstream.calls(upstream_name(chosen)) == 3


def test_it_refuses_request_fallbacks_the_key_may_not_use(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    broken = openai_deployment(make_model, controls=";status=500")
    forbidden = openai_deployment(make_model)
    bob = make_key(allowed_models=[broken.name])

    for body in (
        chat_body(broken.name, fallbacks=[forbidden.name]),
        {**chat_body(broken.name), "models": [broken.name, forbidden.name]},
        chat_body(broken.name, fallbacks=[unique("no-such-model")]),
    ):
        response = post(live_gateway, bob.secret, "chat/completions", body)
        if "no-such-model" in str(body):
            assert_openai_error(response, 404, "model_not_found")
        else:
            assert_openai_error(response, 403, "model_not_allowed")
        assert ledger(response.headers["x-request-id"]) == []
    assert mock_upstream.calls(upstream_name(broken)) == 0
    assert mock_upstream.calls(upstream_name(forbidden)) == 0

    # On /v1/messages the refusal is in Anthropic's shape.
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        anthropic_sdk(live_gateway, bob.secret).messages.create(
            model=broken.name,
            max_tokens=10,
            messages=[{"role": "user", "content": "Hi"}],
            extra_body={"fallbacks": [forbidden.name]},
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "permission_error", caught.value.body


def test_it_cools_a_failing_deployment_down_and_tries_it_again(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    name = unique("cooldown")
    bad = openai_deployment(make_model, name=name, controls=";status=500")
    good = openai_deployment(make_model, name=name)
    put_group(
        live_gateway,
        name,
        num_retries=3,
        retry_backoff_seconds=0,
        allowed_fails=2,
        cooldown_seconds=2,
    )
    alice = make_key()
    client = httpx.Client(
        base_url=live_gateway.v1, headers={"authorization": f"Bearer {alice.secret}"}, timeout=30
    )

    def ask() -> httpx.Response:
        response = client.post("/chat/completions", json=chat_body(name))
        # With retries, every request is answered by the healthy deployment.
        assert response.status_code == 200, response.text
        assert response.headers["x-gateway-model"] == good.provider_model
        assert_costed_once(response.headers["x-request-id"])
        return response

    with client:
        # Until the bad deployment has failed twice in a row.
        for _ in range(40):
            ask()
            if mock_upstream.calls(upstream_name(bad)) >= 2:
                break
        opened = time.monotonic()
        assert mock_upstream.calls(upstream_name(bad)) == 2

        # Open: for the cooldown it gets no traffic at all.
        asked = 0
        while asked < 12 and time.monotonic() - opened < 1.5:
            ask()
            asked += 1
        assert asked >= 4, "the machine is too slow to observe a 2 s cooldown"
        assert mock_upstream.calls(upstream_name(bad)) == 2

        # Half-open after 2 s: traffic reaches it again.
        time.sleep(max(0.0, opened + 2.2 - time.monotonic()))
        for _ in range(40):
            ask()
            if mock_upstream.calls(upstream_name(bad)) > 2:
                break
        assert mock_upstream.calls(upstream_name(bad)) > 2


def test_it_falls_back_instead_of_waiting_longer_than_allowed(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    limited = openai_deployment(make_model, controls=";fail_first=1;status=429;retry_after=5")
    backup = openai_deployment(make_model)
    put_group(
        live_gateway,
        limited.name,
        num_retries=2,
        retry_backoff_seconds=0,
        max_retry_after_seconds=1,
        fallbacks=[backup.name],
    )
    alice = make_key()

    started = time.monotonic()
    response = post(live_gateway, alice.secret, "chat/completions", chat_body(limited.name))
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    # 5 s is more than the policy's 1 s: no wait, the fallback answers at once.
    assert elapsed < 2.0, elapsed
    assert response.headers["x-gateway-model"] == backup.provider_model
    assert mock_upstream.calls(upstream_name(limited)) == 1
    assert attempts_of(response.headers["x-request-id"]) == [
        (1, "error", limited.provider_model, 429),
        (2, "success", backup.provider_model, 200),
    ]


def test_it_falls_back_when_the_provider_says_the_prompt_is_too_long(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    # The mock's error message names the model string, so this one reads like a
    # provider's "maximum context length" refusal; its context length is not configured.
    small = openai_deployment(make_model, controls="-context_length;status=400")
    bigger = openai_deployment(make_model)
    other = openai_deployment(make_model)
    put_group(
        live_gateway,
        small.name,
        num_retries=2,
        fallbacks=[other.name],
        context_window_fallbacks=[bigger.name],
    )
    alice = make_key()

    response = post(live_gateway, alice.secret, "chat/completions", chat_body(small.name))

    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-model"] == bigger.provider_model
    assert mock_upstream.calls(upstream_name(small)) == 1
    assert mock_upstream.calls(upstream_name(other)) == 0
    assert attempts_of(response.headers["x-request-id"]) == [
        (1, "error", small.provider_model, 400),
        (2, "success", bigger.provider_model, 200),
    ]


def test_it_falls_back_on_a_content_policy_refusal_only_when_configured(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    # As above: the mock's message carries the model string, here "content_policy".
    strict = openai_deployment(make_model, controls="-content_policy;status=400")
    lenient = openai_deployment(make_model)
    unconfigured = openai_deployment(make_model, controls="-content_policy;status=400")
    put_group(live_gateway, strict.name, num_retries=2, content_policy_fallbacks=[lenient.name])
    put_group(live_gateway, unconfigured.name, num_retries=2, fallbacks=[lenient.name])
    alice = make_key()

    served = post(live_gateway, alice.secret, "chat/completions", chat_body(strict.name))
    refused = post(live_gateway, alice.secret, "chat/completions", chat_body(unconfigured.name))

    assert served.status_code == 200, served.text
    assert served.headers["x-gateway-model"] == lenient.provider_model
    assert mock_upstream.calls(upstream_name(strict)) == 1
    # Plain fallbacks are for failures, not for refusals of the content.
    assert refused.status_code == 400, refused.text
    assert mock_upstream.calls(upstream_name(unconfigured)) == 1
    assert mock_upstream.calls(upstream_name(lenient)) == 1


def test_it_skips_configured_fallbacks_the_key_may_not_use(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    broken = openai_deployment(make_model, controls=";status=500")
    backup = openai_deployment(make_model)
    put_group(live_gateway, broken.name, fallbacks=[backup.name], **NO_RETRIES)
    bob = make_key(allowed_models=[broken.name])

    response = post(live_gateway, bob.secret, "chat/completions", chat_body(broken.name))

    assert_openai_error(response, 502, "upstream_error")
    assert mock_upstream.calls(upstream_name(backup)) == 0
    assert attempts_of(response.headers["x-request-id"]) == [
        (1, "error", broken.provider_model, 500)
    ]


def test_it_falls_back_before_a_stream_starts(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    broken = openai_deployment(make_model, controls=";status=503")
    backup = anthropic_deployment(make_model, mock_upstream)
    put_group(live_gateway, broken.name, fallbacks=[backup.name], **NO_RETRIES)
    alice = make_key()

    raw = openai_sdk(live_gateway, alice.secret).chat.completions.with_raw_response.create(
        model=broken.name, messages=[{"role": "user", "content": "Stream anyway"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)

    assert text.startswith("Mock reply to: Stream anyway"), text
    assert raw.headers["x-gateway-model"] == backup.provider_model
    assert raw.headers["x-gateway-attempts"] == "2"
    rows = ledger(raw.headers["x-request-id"])
    assert [(r.status, r.provider_model, r.stream) for r in rows] == [
        ("error", broken.provider_model, True),
        ("success", backup.provider_model, True),
    ]
    assert_costed_once(raw.headers["x-request-id"])


def test_it_retries_a_stream_that_fails_to_start(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    flaky = openai_deployment(make_model, controls=";fail_first=2;status=500")
    put_group(live_gateway, flaky.name, num_retries=2, retry_backoff_seconds=0, allowed_fails=100)
    alice = make_key()

    raw = openai_sdk(live_gateway, alice.secret).chat.completions.with_raw_response.create(
        model=flaky.name, messages=[{"role": "user", "content": "Third time lucky"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)

    assert text.startswith("Mock reply to: Third time lucky"), text
    assert raw.headers["x-gateway-attempts"] == "3"
    assert mock_upstream.calls(upstream_name(flaky)) == 3
    assert [r.status for r in ledger(raw.headers["x-request-id"])] == ["error", "error", "success"]
    assert_costed_once(raw.headers["x-request-id"])
