"""The opt-in exact-match response cache.

On per request with `x-gateway-cache: on`, or for every request of a key (or team) with
a cache TTL. A hit calls no provider and is free, but still has its ledger row; teams
never share entries; `Cache-Control: no-cache` skips the lookup; a cached stream is
replayed as a stream.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.http import anthropic_sdk, chat_body, openai_sdk, post, unique
from tests.support.models import anthropic_deployment, openai_deployment
from tests.support.money import ledger, upstream_name, usd

pytestmark = pytest.mark.e2e

CACHE_ON = {"x-gateway-cache": "on"}


def test_it_serves_a_repeated_request_from_the_cache(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    deployment = openai_deployment(make_model)
    alice = make_key()
    body = chat_body(deployment.name, unique("Remember this"))

    first = post(live_gateway, alice.secret, "chat/completions", body, CACHE_ON)
    second = post(live_gateway, alice.secret, "chat/completions", body, CACHE_ON)

    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert first.headers["x-gateway-cache"] == "miss"
    assert second.headers["x-gateway-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert mock_upstream.calls(upstream_name(deployment)) == 1
    [miss_row] = ledger(first.headers["x-request-id"])
    [hit_row] = ledger(second.headers["x-request-id"])
    assert (miss_row.cache_hit, hit_row.cache_hit) == (False, True)
    assert miss_row.charged_cost_micro_usd > 0
    assert hit_row.charged_cost_micro_usd == 0
    assert usd(second.headers["x-gateway-cost-usd"]) == 0
    assert usd(first.headers["x-gateway-cost-usd"]) == miss_row.charged_cost_micro_usd
    # What the hit would have cost is still known: the usage of the cached answer.
    assert (hit_row.prompt_tokens, hit_row.completion_tokens) == (
        miss_row.prompt_tokens,
        miss_row.completion_tokens,
    )
    assert hit_row.endpoint == "chat.completions"
    assert hit_row.model == deployment.name

    # Without the header (and no TTL on the key) the cache is off.
    third = post(live_gateway, alice.secret, "chat/completions", body)
    assert "x-gateway-cache" not in third.headers
    assert mock_upstream.calls(upstream_name(deployment)) == 2


def test_it_caches_every_request_of_a_key_with_a_cache_ttl(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any, make_team: Any
) -> None:
    deployment = openai_deployment(make_model)
    alice = make_key(cache_ttl_seconds=60)
    body = chat_body(deployment.name, unique("Cached by default"))

    first = post(live_gateway, alice.secret, "chat/completions", body)
    second = post(live_gateway, alice.secret, "chat/completions", body)
    other_question = post(
        live_gateway, alice.secret, "chat/completions", chat_body(deployment.name, "Different")
    )

    assert first.headers["x-gateway-cache"] == "miss"
    assert second.headers["x-gateway-cache"] == "hit"
    assert other_question.headers["x-gateway-cache"] == "miss"
    assert mock_upstream.calls(upstream_name(deployment)) == 2

    # A TTL on the team applies to its keys that have none of their own.
    bob = make_key(team=make_team(cache_ttl_seconds=60))
    team_body = chat_body(deployment.name, unique("Cached for the team"))
    states = [
        post(live_gateway, bob.secret, "chat/completions", team_body).headers["x-gateway-cache"]
        for _ in range(2)
    ]
    assert states == ["miss", "hit"]
    assert mock_upstream.calls(upstream_name(deployment)) == 3


def test_it_never_shares_an_entry_between_teams(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any, make_team: Any
) -> None:
    deployment = openai_deployment(make_model)
    alice = make_key(team=make_team())
    charlie = make_key(team=make_team())
    body = chat_body(deployment.name, unique("Team secret"))

    mine = post(live_gateway, alice.secret, "chat/completions", body, CACHE_ON)
    theirs = post(live_gateway, charlie.secret, "chat/completions", body, CACHE_ON)
    theirs_again = post(live_gateway, charlie.secret, "chat/completions", body, CACHE_ON)

    assert mine.headers["x-gateway-cache"] == "miss"
    assert theirs.headers["x-gateway-cache"] == "miss"
    assert mock_upstream.calls(upstream_name(deployment)) == 2
    [row] = ledger(theirs.headers["x-request-id"])
    assert not row.cache_hit and row.charged_cost_micro_usd > 0
    # The other team's own entry serves the other team.
    assert theirs_again.headers["x-gateway-cache"] == "hit"
    assert mock_upstream.calls(upstream_name(deployment)) == 2


def test_it_skips_the_lookup_for_no_cache(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    deployment = openai_deployment(make_model)
    alice = make_key()
    body = chat_body(deployment.name, unique("Fresh please"))

    post(live_gateway, alice.secret, "chat/completions", body, CACHE_ON)
    fresh = post(
        live_gateway,
        alice.secret,
        "chat/completions",
        body,
        {**CACHE_ON, "cache-control": "no-cache"},
    )
    cached = post(live_gateway, alice.secret, "chat/completions", body, CACHE_ON)

    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["x-gateway-cache"] == "miss"
    [row] = ledger(fresh.headers["x-request-id"])
    assert not row.cache_hit and row.charged_cost_micro_usd > 0
    assert cached.headers["x-gateway-cache"] == "hit"
    assert mock_upstream.calls(upstream_name(deployment)) == 2


def test_it_replays_a_cached_chat_stream_as_a_stream(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    deployment = openai_deployment(make_model)
    client = openai_sdk(live_gateway, make_key().secret)
    question = unique("Stream it twice")

    def streamed() -> tuple[str, str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=deployment.name,
            messages=[{"role": "user", "content": question}],
            stream=True,
            extra_headers=CACHE_ON,
        )
        assert raw.headers["content-type"].startswith("text/event-stream")
        text = "".join(
            chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices
        )
        return text, raw.headers["x-gateway-cache"], raw.headers["x-request-id"]

    first_text, first_state, first_id = streamed()
    second_text, second_state, second_id = streamed()

    assert (first_state, second_state) == ("miss", "hit")
    assert first_text.startswith("Mock reply to: ")
    assert second_text == first_text
    assert mock_upstream.calls(upstream_name(deployment)) == 1
    [hit_row] = ledger(second_id)
    assert hit_row.cache_hit and hit_row.stream
    assert hit_row.charged_cost_micro_usd == 0
    assert ledger(first_id)[0].charged_cost_micro_usd > 0


def test_it_replays_a_cached_messages_stream_as_a_stream(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    deployment = anthropic_deployment(make_model, mock_upstream)
    client = anthropic_sdk(live_gateway, make_key().secret)
    question = unique("Anthropic stream")

    def streamed() -> tuple[str, list[str], str]:
        with client.messages.stream(
            model=deployment.name,
            max_tokens=100,
            messages=[{"role": "user", "content": question}],
            extra_headers=CACHE_ON,
        ) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
            state = stream.response.headers["x-gateway-cache"]
        text = "".join(block.text for block in final.content if block.type == "text")
        return text, [kinds[0], kinds[-1]], state

    first_text, first_ends, first_state = streamed()
    second_text, second_ends, second_state = streamed()

    assert (first_state, second_state) == ("miss", "hit")
    assert first_ends == second_ends == ["message_start", "message_stop"]
    assert second_text == first_text and first_text.startswith("Mock reply to: ")
    assert mock_upstream.calls(upstream_name(deployment)) == 1


@pytest.mark.parametrize(
    ("path", "make_body"),
    [
        ("completions", lambda model, text: {"model": model, "prompt": text, "max_tokens": 20}),
        ("responses", lambda model, text: {"model": model, "input": text}),
        (
            "messages",
            lambda model, text: {
                "model": model,
                "max_tokens": 50,
                "messages": [{"role": "user", "content": text}],
            },
        ),
    ],
)
def test_it_caches_every_endpoint(
    live_gateway: Any,
    mock_upstream: Any,
    make_model: Any,
    make_key: Any,
    path: str,
    make_body: Any,
) -> None:
    deployment = openai_deployment(make_model)
    alice = make_key()
    body = make_body(deployment.name, unique("Cache me"))

    first = post(live_gateway, alice.secret, path, body, CACHE_ON)
    second = post(live_gateway, alice.secret, path, body, CACHE_ON)

    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert (first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]) == ("miss", "hit")
    assert second.content == first.content
    assert mock_upstream.calls(upstream_name(deployment)) == 1
    [row] = ledger(second.headers["x-request-id"])
    assert row.cache_hit and row.charged_cost_micro_usd == 0
