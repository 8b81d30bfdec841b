"""Each request a client sees is in the ledger exactly once, at the cost it was told."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.support.http import sse_chunks, unique, usage_of
from tests.support.money import cost_micro_usd, usd

pytestmark = pytest.mark.e2e

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello ledger"}]


def rows_for(request_id: str) -> list:
    from billing.models import LedgerEntry

    return list(LedgerEntry.objects.filter(request_id=request_id))


def test_it_writes_one_row_for_a_chat_completion_at_the_header_cost(
    live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()

    raw = OpenAI(
        base_url=live_gateway.v1, api_key=issued.secret, max_retries=0
    ).chat.completions.with_raw_response.create(model=model.name, messages=HELLO)
    reply = raw.parse()

    [row] = rows_for(raw.headers["x-request-id"])
    assert row.status == "success"
    assert row.stream is False
    assert row.model == model.name
    assert row.key_id == issued.key.id
    assert row.team_id == issued.key.team_id
    usage = usage_of(reply)
    assert row.prompt_tokens == usage.prompt_tokens
    assert row.completion_tokens == usage.completion_tokens
    assert row.charged_cost_micro_usd == usd(raw.headers["x-gateway-cost-usd"])
    assert row.charged_cost_micro_usd == cost_micro_usd(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, prices=("1", "2")
    )


def test_it_writes_one_row_for_an_embedding(live_gateway, make_model, make_key):
    model = make_model(name=unique("embed"))
    issued = make_key()

    raw = OpenAI(
        base_url=live_gateway.v1, api_key=issued.secret, max_retries=0
    ).embeddings.with_raw_response.create(model=model.name, input="ledger", encoding_format="float")

    [row] = rows_for(raw.headers["x-request-id"])
    assert row.status == "success"
    assert row.prompt_tokens == raw.parse().usage.prompt_tokens
    assert row.charged_cost_micro_usd == usd(raw.headers["x-gateway-cost-usd"])


def test_it_writes_one_row_for_a_stream_with_the_usage_the_client_saw(
    live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()

    response = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json={
            "model": model.name,
            "messages": HELLO,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    )
    chunks, done = sse_chunks(response.text)
    usage = chunks[-1]["usage"]
    request_id = response.headers["x-request-id"]

    assert done
    # The row is written before [DONE] is sent, so it is there once the client has it all.
    [row] = rows_for(request_id)
    assert row.status == "success"
    assert row.stream is True
    assert row.ttft_ms is not None
    assert row.ttft_ms >= 0
    assert row.prompt_tokens == usage["prompt_tokens"]
    assert row.completion_tokens == usage["completion_tokens"]
    assert row.charged_cost_micro_usd == cost_micro_usd(
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        prices=("1", "2"),
    )


def test_it_bills_a_stream_even_when_the_client_did_not_ask_for_usage(
    live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    plain = client.chat.completions.create(model=model.name, messages=HELLO)
    with client.chat.completions.with_streaming_response.create(
        model=model.name, messages=HELLO, stream=True
    ) as streamed:
        request_id = streamed.headers["x-request-id"]
        list(streamed.iter_lines())

    [row] = rows_for(request_id)
    assert row.status == "success"
    assert row.prompt_tokens == usage_of(plain).prompt_tokens
    assert row.completion_tokens == usage_of(plain).completion_tokens
    assert row.charged_cost_micro_usd > 0


def test_it_writes_one_zero_cost_error_row_for_an_upstream_failure(
    live_gateway, make_model, make_key
):
    from gateway import services

    name = unique("broken")
    model = make_model(name=name, provider_model=f"openai/{name};status=500")
    # One attempt only: retries (each its own row) are covered by the routing tests.
    services.group_save(name=name, num_retries=0)
    issued = make_key()

    response = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json={"model": model.name, "messages": HELLO},
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    )

    assert response.status_code == 502
    [row] = rows_for(response.headers["x-request-id"])
    assert row.status == "error"
    assert row.charged_cost_micro_usd == 0
    assert row.list_cost_micro_usd == 0
    assert (
        "x-gateway-cost-usd" not in response.headers
        or usd(response.headers["x-gateway-cost-usd"]) == 0
    )


def test_it_writes_no_row_for_a_request_refused_before_the_provider(
    live_gateway, make_model, make_key
):
    from billing.models import LedgerEntry

    model = make_model()
    issued = make_key()
    before = LedgerEntry.objects.count()

    refused = [
        httpx.post(
            f"{live_gateway.v1}/chat/completions",
            json={"model": model.name, "messages": HELLO, **extra},
            headers={"authorization": f"Bearer {issued.secret}"},
            timeout=30,
        )
        for extra in ({"temperature": 9}, {"api_base": "http://127.0.0.1:1"}, {"bogus": 1})
    ]

    assert [r.status_code for r in refused] == [400, 400, 400]
    assert LedgerEntry.objects.count() == before


def test_it_writes_a_row_per_request_under_concurrency(live_gateway, make_model, make_key):
    import asyncio

    from openai import AsyncOpenAI

    from billing.models import LedgerEntry

    model = make_model()
    issued = make_key()

    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)
        try:

            async def one(index: int) -> str:
                messages: list[ChatCompletionMessageParam] = [
                    {"role": "user", "content": f"n{index}"}
                ]
                if index % 2:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=model.name, messages=messages
                    )
                    return raw.headers["x-request-id"]
                stream = await client.chat.completions.create(
                    model=model.name, messages=messages, stream=True
                )
                async for _ in stream:
                    pass
                return stream.response.headers["x-request-id"]

            return list(await asyncio.gather(*(one(i) for i in range(10))))
        finally:
            await client.close()

    request_ids = asyncio.run(run())

    # No waiting: every row is written before its response (or its [DONE]) is complete.
    rows = LedgerEntry.objects.filter(request_id__in=request_ids)
    assert sorted(rows.values_list("request_id", flat=True)) == sorted(request_ids)
    assert all(row.status == "success" for row in rows)
