"""Red team, issue #12 item 5: a batch line that runs again is billed for what it really cost.

A line is run again when the worker running it dies (its claim lapses and another
worker takes it). The rerun keeps the line's ledger request id, so its attempts must
continue the numbering of the rows already written, or the ledger's unique
(request_id, attempt) silently drops them: the provider is paid, the ledger and the
budget counters never hear of it.
"""

from __future__ import annotations

import io
import json
import uuid
from decimal import ROUND_CEILING, Decimal
from typing import Any

import pytest
import redis
from openai import OpenAI

from billing.models import LedgerEntry
from gateway import services
from gateway.models import BatchLine
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
BUDGET = 10_000_000  # micro-USD: plenty, but it makes the key's budget counter exist


def _full_price(row: LedgerEntry) -> int:
    # Live batch lines are charged what the provider is paid (no emulated discount set).
    exact = row.prompt_tokens * INPUT + row.completion_tokens * OUTPUT
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def _one_line_batch(sdk: OpenAI, model: str) -> str:
    line = {
        "custom_id": "only",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30},
    }
    uploaded = sdk.files.create(
        file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch"
    )
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def _key_counter(env: dict[str, str], key_id: int) -> dict[bytes, bytes]:
    counters = redis.Redis.from_url(env["REDIS_URL"])
    names: list[Any] = list(counters.keys(f"gw:bud:k:{key_id}:*"))
    assert len(names) <= 1, names  # one budget period
    if not names:
        return {}
    state: dict[bytes, bytes] = counters.hgetall(names[0])  # type: ignore[assignment]
    return state


def test_it_bills_the_attempts_of_a_line_rerun_after_its_worker_died_mid_retry(
    celery_workers,
    live_gateway,
    mock_upstream,
    make_model,
    make_key,
):
    """The first run fails once and dies in its retry back-off; the rerun succeeds.

    Before the fix the rerun's success was attempt 1 again: it collided with the
    error row and was dropped, and the rerun skipped admission so nothing was
    settled. The provider served two requests; the ledger showed one error row and
    the key's counter showed nothing spent.
    """
    first = celery_workers.ensure()
    provider_model = f"rerun-{uuid.uuid4().hex[:8]};fail_first=1"
    model = make_model(provider_model=f"openai/{provider_model}")
    # One retry after a long back-off: the worker is killed while it waits.
    services.group_save(name=model.name, num_retries=1, retry_backoff_seconds=8)
    issued = make_key(max_budget_micro_usd=BUDGET)
    sdk = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    batch_id = _one_line_batch(sdk, model.name)
    request_id = BatchLine.objects.get(batch__public_id=batch_id).request_id
    wait_for(
        lambda: LedgerEntry.objects.filter(request_id=request_id, status="error").exists(),
        30,
        0.02,
        "the first attempt's error row",
    )
    first.kill9()  # in the back-off before the retry: the line's claim will lapse
    assert mock_upstream.calls(provider_model) == 1

    celery_workers.start()
    done = wait_for(
        lambda: (b := sdk.batches.retrieve(batch_id)).status == "completed" and b,
        60,
        0.3,
        "the rerun to complete the batch",
    )
    assert done.request_counts is not None and done.request_counts.completed == 1
    assert done.output_file_id is not None
    served = mock_upstream.calls(provider_model)
    assert served == 2  # the failed attempt and the rerun's successful one

    rows = list(LedgerEntry.objects.filter(request_id=request_id).order_by("attempt"))
    # One row per provider call, numbered on from the first run's.
    assert [(r.attempt, r.status) for r in rows] == [(1, "error"), (2, "success")], rows
    success = rows[1]
    assert success.charged_cost_micro_usd == _full_price(success) > 0
    assert rows[0].charged_cost_micro_usd == 0
    output = json.loads(sdk.files.content(done.output_file_id).text)
    assert output["response"]["body"]["usage"]["completion_tokens"] == success.completion_tokens

    # The rerun was admitted and settled: the key's counter holds exactly the ledger's spend.
    def settled() -> dict[bytes, bytes] | None:
        state = _key_counter(live_gateway.env, issued.key.id)
        return state if state.get(b"spent", b"0") != b"0" else None

    state = wait_for(
        settled,
        10,
        0.1,
        "the rerun's spend to be settled",
    )
    assert int(state[b"spent"]) == success.charged_cost_micro_usd
    # The rerun's own reservation was settled. The killed run's is leased: it is still
    # held within one lease of the kill (its renewer died with the worker) and released
    # by the first admission after that, so either it alone is left or nothing is.
    counters = redis.Redis.from_url(live_gateway.env["REDIS_URL"])
    held: dict[bytes, bytes] = counters.hgetall("gw:res:val")  # type: ignore[assignment]
    mine = [v for k, v in held.items() if k.decode().startswith(f"{request_id}:")]
    assert len(mine) <= 1, mine
    assert int(state[b"reserved"]) == sum(int(v.split(b"|")[0]) for v in mine)
