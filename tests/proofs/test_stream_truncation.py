"""Promise 6: a connection reset mid-stream reaches the client as an error, never as a
silently truncated success, on every streaming endpoint and through the official SDKs.

The mock upstream aborts the TCP connection after 3 content chunks. Whatever the
endpoint (chat completions, Anthropic Messages, Responses) and whichever path the
gateway takes (bytes forwarded to an upstream of the same dialect, or litellm
translating), the SDK must raise while iterating, after having seen the first chunks,
and must never see the stream's end marker. The ledger records the attempt as partial.
(Postgres/Redis outages, client disconnects and upstream faults are the other proofs here
and tests/gateway/test_fallbacks_e2e.py; the raw-HTTP chat case is
tests/gateway/test_streaming_e2e.py.)
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import anthropic
import openai
import pytest

pytestmark = pytest.mark.e2e

CUT = ";drop_after_chunks=3;chunks=20"
CLAUDE = "claude-3-5-haiku-20241022"


def deployment(make_model: Any, mock_upstream: Any, dialect: str) -> Any:
    tag = uuid.uuid4().hex[:10]
    if dialect == "anthropic":
        return make_model(
            name=f"cut-claude-{tag}",
            provider_model=f"anthropic/{CLAUDE};id={tag}{CUT}",
            api_base=mock_upstream.url,
        )
    return make_model(name=f"cut-gpt-{tag}", provider_model=f"openai/cut-{tag}{CUT}")


def ledger_statuses(request_id: str) -> list[str]:
    from billing.models import LedgerEntry

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = list(LedgerEntry.objects.filter(request_id=request_id).order_by("attempt"))
        if rows:
            return [row.status for row in rows]
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_chat_stream_cut_by_the_provider_raises_in_the_openai_sdk(
    live_gateway, mock_upstream, make_model, make_key, dialect
):
    model = deployment(make_model, mock_upstream, dialect)
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=make_key().secret, max_retries=0)
    seen: list[Any] = []

    stream = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "tell me a story"}], stream=True
    )
    request_id = stream.response.headers["x-request-id"]
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            seen.append(chunk)

    assert any(c.choices and c.choices[0].delta.content for c in seen), "no chunk arrived first"
    assert not any(c.choices and c.choices[0].finish_reason for c in seen), seen[-1]
    body = caught.value.body
    assert isinstance(body, dict) and body.get("code"), body
    assert ledger_statuses(request_id) == ["partial"]


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
def test_a_messages_stream_cut_by_the_provider_raises_in_the_anthropic_sdk(
    live_gateway, mock_upstream, make_model, make_key, dialect
):
    model = deployment(make_model, mock_upstream, dialect)
    client = anthropic.Anthropic(
        base_url=live_gateway.url, api_key=make_key().secret, max_retries=0
    )
    events: list[str] = []

    stream = client.messages.create(
        model=model.name,
        max_tokens=500,
        messages=[{"role": "user", "content": "tell me a story"}],
        stream=True,
    )
    request_id = stream.response.headers["x-request-id"]
    with pytest.raises(anthropic.APIError):
        for event in stream:
            events.append(event.type)

    assert "content_block_delta" in events, events
    assert "message_stop" not in events, events
    assert ledger_statuses(request_id) == ["partial"]


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_responses_stream_cut_by_the_provider_raises_in_the_openai_sdk(
    live_gateway, mock_upstream, make_model, make_key, dialect
):
    model = deployment(make_model, mock_upstream, dialect)
    client = openai.OpenAI(base_url=live_gateway.v1, api_key=make_key().secret, max_retries=0)
    events: list[str] = []

    stream = client.responses.create(model=model.name, input="tell me a story", stream=True)
    request_id = stream.response.headers["x-request-id"]
    with pytest.raises(openai.APIError):
        for event in stream:
            events.append(event.type)

    assert "response.output_text.delta" in events, events
    assert not {"response.completed", "response.incomplete"} & set(events), events
    assert ledger_statuses(request_id) == ["partial"]
