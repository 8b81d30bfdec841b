"""Requests and tokens per minute, per key and per team, in fixed one-minute windows."""

from __future__ import annotations

import re
import time

import openai
import pytest

from billing.models import LedgerEntry
from tests.support.http import HELLO, openai_sdk, sdk_error_body
from tests.support.money import output_priced_model, upstream_name
from tests.support.waiting import fresh_minute

pytestmark = pytest.mark.e2e

RESET_TEXT = re.compile(r"^(?:(\d+)m)?(\d+)s$|^(\d+)ms$")


def reset_seconds(text: str) -> float:
    """OpenAI's x-ratelimit-reset-* format ("1m30s", "59s", "20ms") in seconds."""
    match = RESET_TEXT.match(text)
    assert match, text
    minutes, seconds, millis = match.groups()
    if millis is not None:
        return int(millis) / 1000
    return int(minutes or 0) * 60 + int(seconds)


def ask(client: openai.OpenAI, model: str, **kwargs) -> dict[str, str]:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, **kwargs)
    raw.parse()
    return dict(raw.headers)


def refused(client: openai.OpenAI, model: str, **kwargs) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=model, messages=HELLO, **kwargs)
    return caught.value


def test_it_refuses_the_fourth_request_in_a_minute_at_rpm_3(
    live_gateway, mock_upstream, make_model, make_key
):
    model = output_priced_model(make_model, output_tokens=5)
    alice = make_key(rpm_limit=3)
    client = openai_sdk(live_gateway, alice.secret)
    fresh_minute()

    headers = [ask(client, model.name) for _ in range(3)]
    error = refused(client, model.name)

    assert [h["x-ratelimit-limit-requests"] for h in headers] == ["3", "3", "3"]
    assert [h["x-ratelimit-remaining-requests"] for h in headers] == ["2", "1", "0"]
    for h in headers:
        assert 0 < reset_seconds(h["x-ratelimit-reset-requests"]) <= 60, h
        # No token limit on this key: no token headers.
        assert "x-ratelimit-limit-tokens" not in h, h
    assert error.status_code == 429
    assert sdk_error_body(error)["type"] == "rate_limit_exceeded", sdk_error_body(error)
    assert sdk_error_body(error)["code"] == "rate_limit_exceeded", sdk_error_body(error)
    assert "3 requests per minute" in sdk_error_body(error)["message"], sdk_error_body(error)
    assert int(error.response.headers["retry-after"]) > 0
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    # The refused request reached no provider and left no ledger row.
    assert mock_upstream.calls(upstream_name(model)) == 3
    assert LedgerEntry.objects.filter(key_id=alice.key.id).count() == 3


def test_it_sends_the_rate_limit_headers_on_a_stream(live_gateway, make_model, make_key):
    model = output_priced_model(make_model, output_tokens=5)
    client = openai_sdk(live_gateway, make_key(rpm_limit=5, tpm_limit=10_000).secret)
    fresh_minute()

    with client.chat.completions.with_streaming_response.create(
        model=model.name, messages=HELLO, max_tokens=50, stream=True
    ) as response:
        headers = dict(response.headers)
        assert sum(1 for _ in response.iter_lines()) > 1

    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "4"
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert 10_000 - 100 < int(headers["x-ratelimit-remaining-tokens"]) <= 10_000 - 50


def test_it_says_to_retry_when_the_minute_window_ends(live_gateway, make_model, make_key):
    """retry-after is when the fixed window ends: never more than the rest of the minute."""
    model = output_priced_model(make_model, output_tokens=5)
    client = openai_sdk(live_gateway, make_key(rpm_limit=1).secret)
    fresh_minute()
    ask(client, model.name)

    error = refused(client, model.name)
    seconds_left = 60 - time.time() % 60

    retry_after = int(error.response.headers["retry-after"])
    reset = reset_seconds(error.response.headers["x-ratelimit-reset-requests"])
    assert 1 <= retry_after <= int(seconds_left) + 2, (retry_after, seconds_left)
    assert reset <= seconds_left + 2, (reset, seconds_left)
    assert f"Retry after {retry_after}s" in sdk_error_body(error)["message"], sdk_error_body(error)


def test_it_counts_prompt_plus_max_output_tokens_against_tpm(
    live_gateway, mock_upstream, make_model, make_key
):
    model = output_priced_model(make_model, output_tokens=5)
    alice = make_key(tpm_limit=500)
    client = openai_sdk(live_gateway, alice.secret)
    fresh_minute()

    # Each request counts its prompt plus max_tokens=200, though it only generates 5.
    first = ask(client, model.name, max_tokens=200)
    second = ask(client, model.name, max_tokens=200)
    error = refused(client, model.name, max_tokens=200)

    used = 500 - int(first["x-ratelimit-remaining-tokens"])
    assert first["x-ratelimit-limit-tokens"] == "500"
    assert 200 < used < 250, first
    assert int(second["x-ratelimit-remaining-tokens"]) == 500 - 2 * used
    assert "x-ratelimit-limit-requests" not in first
    assert sdk_error_body(error)["type"] == "tokens_exceeded", sdk_error_body(error)
    assert sdk_error_body(error)["code"] == "rate_limit_exceeded", sdk_error_body(error)
    assert "500 tokens" in sdk_error_body(error)["message"], sdk_error_body(error)
    assert int(error.response.headers["retry-after"]) > 0
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert mock_upstream.calls(upstream_name(model)) == 2
    # A request small enough for what is left still fits in the window.
    assert int(ask(client, model.name, max_tokens=1)["x-ratelimit-remaining-tokens"]) >= 0


def test_it_refuses_a_single_request_larger_than_the_tpm_limit(live_gateway, make_model, make_key):
    model = output_priced_model(make_model, output_tokens=5)
    client = openai_sdk(live_gateway, make_key(tpm_limit=100).secret)

    error = refused(client, model.name, max_tokens=1000)

    assert sdk_error_body(error)["type"] == "tokens_exceeded", sdk_error_body(error)


def test_it_applies_the_team_rpm_across_the_teams_keys(
    live_gateway, make_model, make_team, make_key
):
    model = output_priced_model(make_model, output_tokens=5)
    team = make_team(rpm_limit=2)
    alice = openai_sdk(live_gateway, make_key(team=team, name="alice").secret)
    bob = openai_sdk(live_gateway, make_key(team=team, name="bob").secret)
    fresh_minute()

    from_alice = ask(alice, model.name)
    from_bob = ask(bob, model.name)
    error_alice = refused(alice, model.name)
    error_bob = refused(bob, model.name)

    assert from_alice["x-ratelimit-limit-requests"] == "2"
    assert from_alice["x-ratelimit-remaining-requests"] == "1"
    assert from_bob["x-ratelimit-remaining-requests"] == "0"
    for error in (error_alice, error_bob):
        assert sdk_error_body(error)["type"] == "rate_limit_exceeded", sdk_error_body(error)
        assert "team" in sdk_error_body(error)["message"], sdk_error_body(error)
        assert "2 requests per minute" in sdk_error_body(error)["message"], sdk_error_body(error)


def test_it_reports_the_tighter_of_key_and_team_limits(
    live_gateway, make_model, make_team, make_key
):
    model = output_priced_model(make_model, output_tokens=5)
    team = make_team(rpm_limit=10)
    client = openai_sdk(live_gateway, make_key(team=team, rpm_limit=2).secret)
    fresh_minute()

    first = ask(client, model.name)
    second = ask(client, model.name)
    error = refused(client, model.name)

    assert (first["x-ratelimit-limit-requests"], first["x-ratelimit-remaining-requests"]) == (
        "2",
        "1",
    )
    assert second["x-ratelimit-remaining-requests"] == "0"
    assert "this key:" in sdk_error_body(error)["message"], sdk_error_body(error)


def test_it_leaves_another_teams_key_unaffected(live_gateway, make_model, make_team, make_key):
    model = output_priced_model(make_model, output_tokens=5)
    alice_team = make_team(rpm_limit=1)
    alice = openai_sdk(live_gateway, make_key(team=alice_team, name="alice", rpm_limit=1).secret)
    charlie_team = make_team(rpm_limit=2)
    charlie = openai_sdk(live_gateway, make_key(team=charlie_team, name="charlie").secret)
    unlimited = openai_sdk(live_gateway, make_key(name="no limits").secret)
    fresh_minute()

    ask(alice, model.name)
    refused(alice, model.name)
    refused(alice, model.name)

    charlie_headers = [ask(charlie, model.name) for _ in range(2)]
    assert [h["x-ratelimit-remaining-requests"] for h in charlie_headers] == ["1", "0"]
    for _ in range(3):
        headers = ask(unlimited, model.name)
        assert not any(name.startswith("x-ratelimit-") for name in headers), headers
