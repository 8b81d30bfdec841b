"""The Batch API through the official openai SDK, processed by real Celery workers."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any, cast

import openai
import pytest
from django.utils import timezone
from openai import OpenAI
from openai.types import Batch as OpenAIBatch
from openai.types.batch_request_counts import BatchRequestCounts

from billing.models import LedgerEntry
from gateway.models import Batch, BatchLine
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def make_model(make_model: Any) -> Any:
    """These tests are about batches run live, line by line: their models opt out of
    native batches (which tests/workers/test_native_batches.py covers)."""

    def make(*args: Any, **fields: Any) -> Any:
        fields.setdefault("capabilities", {"native_batches": False})
        return make_model(*args, **fields)

    return make


INPUT, OUTPUT = Decimal("1.00"), Decimal("2.00")  # make_model's prices, USD per 1M tokens


def client(live_gateway, secret: str) -> OpenAI:
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_lines(model: str, n: int, prefix: str = "req") -> list[dict]:
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


def upload(sdk: OpenAI, lines: list[dict]):
    return sdk.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")


def wait_done(sdk: OpenAI, batch_id: str, timeout: float = 60):
    return wait_for(
        lambda: (
            (b := sdk.batches.retrieve(batch_id)).status
            in ("completed", "failed", "expired", "cancelled")
            and b
        ),
        timeout,
        0.3,
        f"batch {batch_id} to finish",
    )


def counts(batch: OpenAIBatch) -> BatchRequestCounts:
    assert batch.request_counts is not None, batch
    return batch.request_counts


def request_ids(batch_public_id: str) -> list[str]:
    return list(
        BatchLine.objects.filter(batch__public_id=batch_public_id).values_list(
            "request_id", flat=True
        )
    )


def full_price(row: LedgerEntry) -> int:
    # Live batch lines are charged what the provider is paid (no emulated discount set).
    exact = row.prompt_tokens * INPUT + row.completion_tokens * OUTPUT
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def test_a_batch_of_200_runs_end_to_end_through_the_sdk_at_full_price(
    worker, live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()
    sdk = client(live_gateway, issued.secret)
    uploaded = upload(sdk, chat_lines(model.name, 200))
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert sdk.files.retrieve(uploaded.id).filename == "input.jsonl"

    batch = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status in ("validating", "in_progress") and counts(batch).total == 200
    done = wait_done(sdk, batch.id)
    assert done.status == "completed", done
    assert (counts(done).completed, counts(done).failed) == (200, 0)
    assert done.metadata == {"job": "nightly"} and done.error_file_id is None
    assert done.completed_at and done.in_progress_at and done.finalizing_at

    output = sdk.files.content(done.output_file_id).text.strip().splitlines()
    assert len(output) == 200
    results = [json.loads(line) for line in output]
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(200))
    for result in results:
        assert result["error"] is None and result["response"]["status_code"] == 200
        assert result["id"] == result["response"]["request_id"]
        assert result["response"]["body"]["choices"][0]["message"]["content"]

    rows = list(LedgerEntry.objects.filter(request_id__in=[r["id"] for r in results]))
    assert len(rows) == 200 and {r.status for r in rows} == {"success"}
    for row in rows:
        exact = row.prompt_tokens * INPUT + row.completion_tokens * OUTPUT
        assert row.list_cost_micro_usd == int(exact.to_integral_value(rounding=ROUND_CEILING))
        assert row.charged_cost_micro_usd == full_price(row) > 0
        assert row.team_id == issued.key.team_id and row.key_id == issued.key.id

    listed = sdk.batches.list(limit=5)
    assert [b.id for b in listed.data] == [batch.id]


def test_validation_reports_every_bad_line_and_fails_the_batch(
    worker, live_gateway, make_model, make_key
):
    allowed, forbidden = make_model(), make_model()
    sdk = client(live_gateway, make_key(allowed_models=[allowed.name]).secret)
    good = chat_lines(allowed.name, 2)
    raw = b"\n".join(
        [
            json.dumps(good[0]).encode(),
            b"{not json",
            json.dumps({**good[1], "custom_id": None}).encode(),
            json.dumps(good[0]).encode(),  # duplicate custom_id
            json.dumps({**good[1], "custom_id": "u", "url": "/v1/embeddings"}).encode(),
            json.dumps({**good[1], "custom_id": "m", "method": "GET"}).encode(),
            json.dumps(
                {**good[1], "custom_id": "f", "body": {**good[1]["body"], "model": forbidden.name}}
            ).encode(),
            json.dumps(
                {**good[1], "custom_id": "x", "body": {**good[1]["body"], "model": "no-such"}}
            ).encode(),
        ]
    )
    uploaded = sdk.files.create(file=("bad.jsonl", io.BytesIO(raw)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    errors = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert errors == [
        (2, "invalid_json_line", None),
        (3, "missing_custom_id", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_url", "url"),
        (6, "invalid_method", "method"),
        (7, "model_not_allowed", "body.model"),
        (8, "model_not_found", "body.model"),
    ]
    assert not LedgerEntry.objects.filter(
        team_id=Batch.objects.get(public_id=batch.id).team_id
    ).exists()

    # Request-level mistakes are 400s in OpenAI's error shape.
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.batches.create(
            input_file_id=uploaded.id, endpoint=cast(Any, "/v1/images"), completion_window="24h"
        )
    assert isinstance(exc.value.body, dict) and exc.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window=cast(Any, "1h"),
        )
    with pytest.raises(openai.BadRequestError):
        sdk.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")


def test_files_and_batches_are_invisible_to_other_teams(worker, live_gateway, make_model, make_key):
    model = make_model()
    mine = client(live_gateway, make_key().secret)
    theirs = client(live_gateway, make_key().secret)
    uploaded = upload(mine, chat_lines(model.name, 2))
    batch = mine.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: theirs.files.retrieve(uploaded.id),
        lambda: theirs.files.content(uploaded.id),
        lambda: theirs.batches.retrieve(batch.id),
        lambda: theirs.batches.cancel(batch.id),
        lambda: theirs.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert theirs.batches.list().data == [] and theirs.files.list().data == []
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=live_gateway.v1, api_key="sk-gw-nope", max_retries=0).batches.list()
    assert wait_done(mine, batch.id).status == "completed"


def test_cancel_stops_lines_that_have_not_started(worker, live_gateway, make_model, make_key):
    slow = make_model(provider_model=f"openai/slow-{timezone.now().timestamp():.0f};latency_ms=300")
    sdk = client(live_gateway, make_key().secret)
    batch = sdk.batches.create(
        input_file_id=upload(sdk, chat_lines(slow.name, 60)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_for(lambda: counts(sdk.batches.retrieve(batch.id)).completed >= 1, 30)
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_done(sdk, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    done_counts = counts(done)
    assert 1 <= done_counts.completed < 60 and done_counts.failed == 0
    lines = BatchLine.objects.filter(batch__public_id=batch.id)
    assert lines.filter(status="cancelled").count() == 60 - done_counts.completed
    # Cancelled lines never reached the provider or the ledger.
    billed = LedgerEntry.objects.filter(request_id__in=request_ids(batch.id)).count()
    assert billed == done_counts.completed
    assert (
        len(sdk.files.content(done.output_file_id).text.strip().splitlines())
        == done_counts.completed
    )
    # Cancelling again is a no-op; a finished batch cannot be cancelled.
    assert sdk.batches.cancel(batch.id).status == "cancelled"
    quick = make_model()
    finished = sdk.batches.create(
        input_file_id=upload(sdk, chat_lines(quick.name, 1)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert wait_done(sdk, finished.id).status == "completed"
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(finished.id)


def test_a_batch_past_its_window_expires_with_unrun_lines_in_the_error_file(
    worker, live_gateway, make_model, make_key
):
    slow = make_model(
        provider_model=f"openai/slow2-{timezone.now().timestamp():.0f};latency_ms=300"
    )
    sdk = client(live_gateway, make_key().secret)
    batch = sdk.batches.create(
        input_file_id=upload(sdk, chat_lines(slow.name, 60)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_for(lambda: counts(sdk.batches.retrieve(batch.id)).completed >= 1, 30)
    # The 24 hours are up (as if they had passed).
    Batch.objects.filter(public_id=batch.id).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    done = wait_done(sdk, batch.id)
    assert done.status == "expired" and done.expired_at
    errors = [json.loads(line) for line in sdk.files.content(done.error_file_id).text.splitlines()]
    expired = [e for e in errors if e["error"] and e["error"]["code"] == "batch_expired"]
    assert len(expired) == 60 - counts(done).completed > 0
    assert all(e["response"] is None for e in expired)
    assert LedgerEntry.objects.filter(request_id__in=request_ids(batch.id)).count() == (
        counts(done).completed
    )


def test_a_worker_killed_mid_batch_is_resumed_and_every_line_is_billed_once(
    celery_workers, live_gateway, make_model, make_key
):
    first = celery_workers.ensure()
    model = make_model(provider_model=f"openai/kill-{timezone.now().timestamp():.0f};latency_ms=40")
    sdk = client(live_gateway, make_key().secret)
    batch = sdk.batches.create(
        input_file_id=upload(sdk, chat_lines(model.name, 200)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_for(lambda: Batch.objects.filter(public_id=batch.id, completed__gte=40).exists(), 60, 0.02)
    first.kill9()  # mid-batch: lines are in flight, some provider calls already answered
    at_kill = Batch.objects.get(public_id=batch.id)
    assert at_kill.status == "in_progress" and at_kill.completed < 200
    assert BatchLine.objects.filter(batch=at_kill, status="running").exists()

    celery_workers.start()
    done = wait_done(sdk, batch.id, timeout=90)
    assert done.status == "completed", done
    assert (counts(done).completed, counts(done).failed) == (200, 0)
    output = [json.loads(line) for line in sdk.files.content(done.output_file_id).text.splitlines()]
    assert len(output) == 200
    assert len({o["custom_id"] for o in output}) == 200
    rows = LedgerEntry.objects.filter(request_id__in=request_ids(batch.id))
    charged = [row for row in rows if row.charged_cost_micro_usd]
    # Charged exactly once each, the interrupted lines included. A line whose answer
    # was lost in the kill after its row was written is re-run: that provider call
    # has a row of its own (its list cost) charged nothing.
    assert len({row.request_id for row in charged}) == len(charged) == 200
    assert all(row.charged_cost_micro_usd == full_price(row) for row in charged)
    assert all(row.list_cost_micro_usd > 0 for row in rows if not row.charged_cost_micro_usd)
