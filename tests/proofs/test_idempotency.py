"""Promise: the same Idempotency-Key sent many times at once reaches the provider once."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _post(url: str, secret: str, body: dict, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {secret}", "idempotency-key": key},
        timeout=30,
    )


@pytest.mark.parametrize("stream", [False, True])
def test_it_calls_upstream_once_for_five_concurrent_repeats(
    live_gateway, mock_upstream, make_model, make_key, stream
):
    from billing.models import LedgerEntry

    name = f"idem-{uuid.uuid4().hex[:8]}"
    # Latency keeps the first call in flight while the repeats arrive.
    upstream_model = f"{name};latency_ms=300"
    make_model(name=name, provider_model=f"openai/{upstream_model}")
    issued = make_key()
    body = {"model": name, "messages": [{"role": "user", "content": "once"}], "stream": stream}
    key = f"idem-{uuid.uuid4()}"

    with ThreadPoolExecutor(5) as pool:
        responses = list(
            pool.map(lambda _: _post(live_gateway.v1, issued.secret, body, key), range(5))
        )

    assert [r.status_code for r in responses] == [200] * 5
    assert len({r.content for r in responses}) == 1  # every copy got the first result
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 4
    assert mock_upstream.calls(upstream_model) == 1
    assert LedgerEntry.objects.filter(key_id=issued.key.id).count() == 1
    if stream:
        assert responses[0].text.rstrip().endswith("data: [DONE]")


def test_it_refuses_the_same_key_with_a_different_body(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()
    key = f"idem-{uuid.uuid4()}"
    first = _post(
        live_gateway.v1,
        issued.secret,
        {"model": model.name, "messages": [{"role": "user", "content": "a"}]},
        key,
    )
    second = _post(
        live_gateway.v1,
        issued.secret,
        {"model": model.name, "messages": [{"role": "user", "content": "b"}]},
        key,
    )
    assert first.status_code == 200
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "idempotency_key_reused"


def test_it_scopes_idempotency_keys_to_the_virtual_key(
    live_gateway, mock_upstream, make_model, make_key
):
    name = f"idem-{uuid.uuid4().hex[:8]}"
    make_model(name=name)
    alice, charlie = make_key(), make_key()
    body = {"model": name, "messages": [{"role": "user", "content": "same"}]}
    key = f"idem-{uuid.uuid4()}"
    assert _post(live_gateway.v1, alice.secret, body, key).status_code == 200
    replay = _post(live_gateway.v1, charlie.secret, body, key)
    assert replay.status_code == 200
    assert replay.headers.get("idempotent-replayed") is None  # charlie never sees alice's result
    assert mock_upstream.calls(name) == 2


def test_it_lets_a_failed_request_be_retried_with_the_same_key(
    live_gateway, mock_upstream, make_model, make_key
):
    name = f"idem-{uuid.uuid4().hex[:8]}"
    # A provider 400 is not retried by the gateway, so the first request fails.
    upstream_model = f"{name};fail_first=1;status=400"
    make_model(name=name, provider_model=f"openai/{upstream_model}")
    issued = make_key()
    body = {"model": name, "messages": [{"role": "user", "content": "retry me"}]}
    key = f"idem-{uuid.uuid4()}"
    assert _post(live_gateway.v1, issued.secret, body, key).status_code == 400
    retried = _post(live_gateway.v1, issued.secret, body, key)
    assert retried.status_code == 200
    assert retried.headers.get("idempotent-replayed") is None
    assert mock_upstream.calls(upstream_model) == 2
