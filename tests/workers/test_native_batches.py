"""Native batches: sent to the provider's own batch API (the mock's OpenAI Files+Batches
and Anthropic Message Batches), driven by real Celery workers, billed at batch prices.

No beat process runs in these tests: `play_beat` sends the beat task
(`gateway.native_batches_poll`) through the broker, as beat would, while a test waits.
"""

from __future__ import annotations

import io
import json
import time
from decimal import ROUND_CEILING, Decimal
from typing import Any

import httpx
import litellm
import pytest
from openai import OpenAI

from billing.models import LedgerEntry
from gateway.models import Batch
from tests.support.waiting import wait_for
from tests.support.workers import send_task

pytestmark = pytest.mark.e2e

MICRO = Decimal(1_000_000)


def client(live_gateway: Any, secret: str) -> OpenAI:
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


def chat_lines(model: str, n: int, prefix: str = "req") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Question number {i}?"}],
                "max_tokens": 50,
            },
        }
        for i in range(n)
    ]


def create(sdk: OpenAI, lines: list[dict[str, Any]]) -> Any:
    raw = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = sdk.files.create(file=("input.jsonl", io.BytesIO(raw)), purpose="batch")
    return sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def play_beat() -> None:
    send_task("gateway.native_batches_poll")


def wait_done(sdk: OpenAI, batch_id: str, timeout: float = 90) -> Any:
    last = [0.0]

    def finished() -> Any:
        if time.monotonic() - last[0] > 0.5:
            play_beat()
            last[0] = time.monotonic()
        batch = sdk.batches.retrieve(batch_id)
        return batch.status in ("completed", "failed", "expired", "cancelled") and batch

    return wait_for(finished, timeout, 0.2, f"batch {batch_id} to finish")


def row(batch_id: str) -> Batch:
    return Batch.objects.get(public_id=batch_id)


def mock_stats(mock_upstream: Any) -> dict[str, Any]:
    return dict(httpx.get(f"{mock_upstream.url}/_mock/batch_stats", timeout=5).json())


def per_million(per_token: float) -> Decimal:
    return Decimal(repr(per_token)) * MICRO


def cost(prompt: int, completion: int, input_price: Decimal, output_price: Decimal) -> int:
    exact = prompt * input_price + completion * output_price
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def results(sdk: OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    lines = sdk.files.content(file_id).text.strip().splitlines()
    return {item["custom_id"]: item for item in map(json.loads, lines)}


def test_a_native_batch_of_500_bills_each_line_once_at_the_providers_batch_prices(
    worker, live_gateway, mock_upstream, make_model, make_key
):
    # No price override: litellm's cost map has gpt-4o-mini's batch prices.
    model = make_model(
        provider_model="openai/gpt-4o-mini",
        input_cost_per_million=None,
        output_cost_per_million=None,
    )
    entry = litellm.model_cost["gpt-4o-mini"]
    batch_in = per_million(entry["input_cost_per_token_batches"])
    batch_out = per_million(entry["output_cost_per_token_batches"])
    assert batch_in < per_million(entry["input_cost_per_token"])
    issued = make_key()
    sdk = client(live_gateway, issued.secret)
    before = mock_stats(mock_upstream)

    batch = create(sdk, chat_lines(model.name, 500))
    done = wait_done(sdk, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (500, 0)
    stored = row(batch.id)
    assert stored.native_provider == "openai" and stored.native_state == "done"
    assert stored.provider_batch_id and stored.provider_file_id
    after = mock_stats(mock_upstream)
    assert after["batch_creates"] - before["batch_creates"] == 1
    assert after["creates_by_input_file"][stored.provider_file_id] == 1

    output = results(sdk, done.output_file_id)
    assert len(output) == 500 and done.error_file_id is None
    rows = {r.request_id: r for r in LedgerEntry.objects.filter(team_id=issued.key.team_id)}
    assert len(rows) == 500
    for item in output.values():
        # Our ids, not the provider's.
        assert item["id"].startswith("batch_req_") and item["id"] in rows
        usage = item["response"]["body"]["usage"]  # what the provider reported
        entry_row = rows[item["id"]]
        assert (entry_row.prompt_tokens, entry_row.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        expected = cost(usage["prompt_tokens"], usage["completion_tokens"], batch_in, batch_out)
        assert entry_row.list_cost_micro_usd == expected > 0
        assert entry_row.charged_cost_micro_usd == expected  # no markup
        assert entry_row.is_batch and entry_row.attempt == 1 and entry_row.status == "success"


def test_a_worker_killed_mid_download_resumes_with_one_provider_batch_and_one_row_per_line(
    celery_workers, live_gateway, mock_upstream, make_model, make_key
):
    first = celery_workers.ensure()
    # Manual advance: the test says when the provider's batch ends. Admin prices (1 and
    # 2 USD per 1M) and no batch prices in the map: half of them.
    model = make_model(provider_model=f"openai/kill-{time.time():.0f};batch_advance=manual")
    issued = make_key()
    sdk = client(live_gateway, issued.secret)
    before = mock_stats(mock_upstream)
    batch = create(sdk, chat_lines(model.name, 500))

    def submitted() -> bool:
        play_beat()
        return row(batch.id).native_state == "submitted"

    wait_for(submitted, 60, 0.3, "the provider batch to be submitted")
    provider_id = row(batch.id).provider_batch_id
    for _ in range(3):  # validating -> in_progress -> finalizing -> completed
        httpx.post(f"{mock_upstream.url}/_mock/batches/{provider_id}/advance", timeout=30)
    play_beat()
    team_rows = LedgerEntry.objects.filter(team_id=issued.key.team_id)
    wait_for(lambda: team_rows.exists(), 60, 0.005, "the first result line to be billed")
    first.kill9()
    at_kill = row(batch.id)
    billed_at_kill = team_rows.count()
    assert at_kill.native_state == "downloading", (at_kill.native_state, billed_at_kill)
    assert billed_at_kill < 500

    celery_workers.start()
    done = wait_done(sdk, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == 500
    after = mock_stats(mock_upstream)
    assert after["batch_creates"] - before["batch_creates"] == 1
    assert after["creates_by_input_file"][row(batch.id).provider_file_id] == 1
    rows = list(team_rows)
    assert len(rows) == len({r.request_id for r in rows}) == 500
    output = results(sdk, done.output_file_id)
    assert {r.request_id for r in rows} == {item["id"] for item in output.values()}
    for r in rows:
        half = cost(r.prompt_tokens, r.completion_tokens, Decimal("0.5"), Decimal("1.0"))
        assert r.list_cost_micro_usd == r.charged_cost_micro_usd == half > 0


def test_partial_failures_land_in_our_error_file_and_are_not_billed(
    worker, live_gateway, mock_upstream, make_model, make_key
):
    model = make_model(provider_model=f"openai/partial-{time.time():.0f};fail_first=3")
    issued = make_key()
    sdk = client(live_gateway, issued.secret)
    done = wait_done(sdk, create(sdk, chat_lines(model.name, 10)).id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (7, 3)
    errors = results(sdk, done.error_file_id)
    output = results(sdk, done.output_file_id)
    assert len(errors) == 3 and len(output) == 7
    for item in errors.values():
        assert item["id"].startswith("batch_req_")
        assert item["response"]["status_code"] >= 400 and item["response"]["body"]["error"]
    rows = LedgerEntry.objects.filter(team_id=issued.key.team_id)
    assert sorted(r.request_id for r in rows) == sorted(i["id"] for i in output.values())


def test_cancelling_our_batch_cancels_the_providers(
    worker, live_gateway, mock_upstream, make_model, make_key
):
    model = make_model(provider_model=f"openai/cancel-{time.time():.0f};batch_advance=manual")
    issued = make_key()
    sdk = client(live_gateway, issued.secret)
    batch = create(sdk, chat_lines(model.name, 5))

    def submitted() -> bool:
        play_beat()
        return row(batch.id).native_state == "submitted"

    wait_for(submitted, 60, 0.3, "the provider batch to be submitted")
    provider_id = row(batch.id).provider_batch_id
    assert sdk.batches.cancel(batch.id).status == "cancelling"
    provider_url = f"{mock_upstream.url}/v1/batches/{provider_id}"

    def provider_cancelling() -> bool:
        play_beat()
        return httpx.get(provider_url, timeout=5).json()["status"] == "cancelling"

    wait_for(provider_cancelling, 60, 0.3, "the provider's batch to be cancelling")
    httpx.post(f"{mock_upstream.url}/_mock/batches/{provider_id}/advance", timeout=30)
    done = wait_done(sdk, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert httpx.get(provider_url, timeout=5).json()["status"] == "cancelled"
    assert not LedgerEntry.objects.filter(team_id=issued.key.team_id).exists()


def test_an_anthropic_deployments_batch_goes_through_message_batches(
    worker, live_gateway, mock_upstream, make_model, make_key
):
    model = make_model(provider_model="anthropic/claude-3-haiku-20240307")
    issued = make_key()
    sdk = client(live_gateway, issued.secret)
    before = mock_stats(mock_upstream)
    done = wait_done(sdk, create(sdk, chat_lines(model.name, 20)).id)
    assert done.status == "completed", done
    assert row(done.id).native_provider == "anthropic"
    after = mock_stats(mock_upstream)
    assert after["message_batch_creates"] - before["message_batch_creates"] == 1
    output = results(sdk, done.output_file_id)
    assert len(output) == 20
    rows = {r.request_id: r for r in LedgerEntry.objects.filter(team_id=issued.key.team_id)}
    assert len(rows) == 20
    for item in output.values():
        body = item["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        usage, entry_row = body["usage"], rows[item["id"]]
        assert entry_row.prompt_tokens == usage["prompt_tokens"] > 0
        # The map has no batch prices for this model: half the admin's 1 and 2 USD per 1M.
        half = cost(usage["prompt_tokens"], usage["completion_tokens"], Decimal("0.5"), Decimal(1))
        assert entry_row.list_cost_micro_usd == half and entry_row.provider == "anthropic"


def test_a_live_batch_line_is_charged_full_price_unless_a_discount_is_set(
    celery_workers, live_gateway, mock_upstream, make_model, make_key
):
    # Opted out of native batches: its lines run live, the provider paid its live price.
    model = make_model(capabilities={"native_batches": False})
    sdk = client(live_gateway, make_key().secret)
    celery_workers.ensure()
    full = wait_done(sdk, create(sdk, chat_lines(model.name, 3)).id)
    assert full.status == "completed" and not row(full.id).native_state
    ids = [i["id"] for i in results(sdk, full.output_file_id).values()]
    for r in LedgerEntry.objects.filter(request_id__in=ids):
        live = cost(r.prompt_tokens, r.completion_tokens, Decimal(1), Decimal(2))
        assert r.list_cost_micro_usd == r.charged_cost_micro_usd == live > 0

    # An admin's explicit subsidy: charged 25% under the list cost, which stays visible.
    original = dict(celery_workers.env)
    celery_workers.current.stop() if celery_workers.current else None
    celery_workers.env["GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT"] = "25"
    try:
        celery_workers.start()
        discounted = wait_done(sdk, create(sdk, chat_lines(model.name, 3, "d")).id)
        assert discounted.status == "completed"
        ids = [i["id"] for i in results(sdk, discounted.output_file_id).values()]
        rows = list(LedgerEntry.objects.filter(request_id__in=ids))
        assert len(rows) == 3
        for r in rows:
            exact = r.prompt_tokens * Decimal(1) + r.completion_tokens * Decimal(2)
            assert r.list_cost_micro_usd == int(exact.to_integral_value(rounding=ROUND_CEILING))
            charged = int((exact * Decimal("0.75")).to_integral_value(rounding=ROUND_CEILING))
            assert r.charged_cost_micro_usd == charged < r.list_cost_micro_usd
    finally:
        celery_workers.wait_idle()
        if celery_workers.current:
            celery_workers.current.stop()
        celery_workers.env.clear()
        celery_workers.env.update(original)
        celery_workers.start()


def test_an_azure_openai_deployments_batch_goes_to_its_batch_api(
    worker, live_gateway, mock_upstream, make_model, make_key
):
    model = make_model(
        provider_model=f"azure/az-{time.time():.0f}",
        api_base=mock_upstream.url,
        api_version="2024-10-21",
        api_key="azure-test-key",
    )
    issued = make_key()
    sdk = client(live_gateway, issued.secret)
    before = mock_stats(mock_upstream)
    done = wait_done(sdk, create(sdk, chat_lines(model.name, 10)).id)
    assert done.status == "completed", done
    assert row(done.id).native_provider == "azure"
    assert mock_stats(mock_upstream)["batch_creates"] - before["batch_creates"] == 1
    output = results(sdk, done.output_file_id)
    rows = {r.request_id: r for r in LedgerEntry.objects.filter(team_id=issued.key.team_id)}
    assert len(output) == len(rows) == 10
    for item in output.values():
        usage = item["response"]["body"]["usage"]
        half = cost(usage["prompt_tokens"], usage["completion_tokens"], Decimal("0.5"), Decimal(1))
        assert rows[item["id"]].list_cost_micro_usd == half > 0


def key_counter(env: dict[str, str], key_id: int) -> dict[bytes, bytes]:
    import redis

    counters = redis.Redis.from_url(env["REDIS_URL"])
    names: list[Any] = list(counters.keys(f"gw:bud:k:{key_id}:*"))
    assert len(names) <= 1, names
    state: dict[bytes, bytes] = counters.hgetall(names[0]) if names else {}  # type: ignore[assignment]
    return state


def test_a_native_batch_is_admitted_against_budgets_before_it_is_submitted(
    worker, live_gateway, mock_upstream, make_model, make_key
):
    model = make_model(provider_model=f"openai/budget-{time.time():.0f}")
    # 10 lines of at most 50 output tokens at 1 USD per 1M (half of 2): the most they
    # can cost is well above 1 micro-USD, so this key cannot afford the batch.
    poor = make_key(max_budget_micro_usd=1)
    sdk = client(live_gateway, poor.secret)
    before = mock_stats(mock_upstream)
    refused = wait_done(sdk, create(sdk, chat_lines(model.name, 10)).id)
    assert refused.status == "failed", refused
    assert refused.errors is not None and refused.errors.data is not None
    assert refused.errors.data[0].code == "key_budget_exceeded"
    after = mock_stats(mock_upstream)
    assert after["file_uploads"] == before["file_uploads"]
    assert after["batch_creates"] == before["batch_creates"]
    assert not LedgerEntry.objects.filter(team_id=poor.key.team_id).exists()

    # Affordable: reserved before, settled to exactly the ledger's charges after.
    rich = make_key(max_budget_micro_usd=10_000_000)
    sdk = client(live_gateway, rich.secret)
    done = wait_done(sdk, create(sdk, chat_lines(model.name, 10)).id)
    assert done.status == "completed", done
    reservation = row(done.id).native_reservation
    assert reservation is not None and reservation["amount"] > 0
    charged = sum(
        LedgerEntry.objects.filter(team_id=rich.key.team_id).values_list(
            "charged_cost_micro_usd", flat=True
        )
    )
    state = key_counter(live_gateway.env, rich.key.id)
    assert 0 < charged <= reservation["amount"]
    assert int(state[b"spent"]) == charged and int(state.get(b"reserved", b"0")) == 0
