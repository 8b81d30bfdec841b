"""Promise: a stream is billed for what the provider generated, even when the client hangs up."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _read_chunks_then_hang_up(url: str, secret: str, model: str, chunks: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "long story"}], "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {secret}"},
        ) as response,
    ):
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-request-id"]
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                seen += 1
                if seen == chunks:
                    break
    return request_id


def _wait_for_row(request_id: str, timeout: float = 15.0):
    from billing.models import LedgerEntry

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = LedgerEntry.objects.filter(request_id=request_id).first()
        if row is not None:
            return row
        time.sleep(0.1)
    raise AssertionError(f"no ledger row for {request_id}")


@pytest.mark.parametrize("usage", ["reported", "missing"])
def test_it_bills_a_stream_whose_client_disconnects_after_3_chunks(
    live_gateway, mock_upstream, make_model, make_key, usage
):
    name = f"cut-{uuid.uuid4().hex[:8]}"
    controls = ";output_tokens=200;chunks=20;chunk_delay_ms=40"
    if usage == "missing":
        controls += ";no_usage=1"
    make_model(name=name, provider_model=f"openai/{name}{controls}")
    issued = make_key()

    request_id = _read_chunks_then_hang_up(live_gateway.v1, issued.secret, name, chunks=3)

    row = _wait_for_row(request_id)
    assert row.status == "client_disconnected"
    assert row.charged_cost_micro_usd > 0
    assert row.prompt_tokens > 0
    # Billed for everything the provider generated, not just the 3 chunks the client read.
    if usage == "reported":
        assert row.completion_tokens == 200
        assert row.usage_estimated is False
    else:
        # No usage from the provider: the gateway counts the whole generated text
        # (all 20 chunks, drained after the hang-up) with litellm's tokenizer.
        import litellm

        full = httpx.post(
            f"{mock_upstream.api_base}/chat/completions",
            json={
                "model": f"{name}{controls}",
                "messages": [{"role": "user", "content": "long story"}],
            },
            timeout=30,
        ).json()["choices"][0]["message"]["content"]
        expected = litellm.token_counter(model=name, text=full, count_response_tokens=True)
        assert row.completion_tokens == expected
        assert row.usage_estimated is True
