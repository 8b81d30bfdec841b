"""The mock's native batch APIs, driven by the official openai and anthropic SDKs.

OpenAI Files + Batches (also under Azure's /openai/ prefix) and Anthropic Message Batches:
states, controls, partial failures, expiry, cancellation, the results formats, usage equal
to a live call's, and the errors.
"""

from __future__ import annotations

import io
import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from openai.types import Batch

from mock_upstream.batches import MAX_FILES, BatchApi

HELLO: Any = [{"role": "user", "content": "Hello, batch!"}]
CHAT: Any = {"model": "mock-gpt", "messages": HELLO}
CLAUDE: Any = {"model": "mock-claude", "max_tokens": 40, "messages": HELLO}
NO_MAX_TOKENS: Any = {"model": "mock-claude", "messages": HELLO}


def claude_params(**changes: Any) -> Any:
    return {**CLAUDE, **changes}


@pytest.fixture
def claude(mock_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock_url, api_key="x", max_retries=0)


def line(custom_id: str, body: Any, url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(oai: openai.OpenAI, lines: list[Any], name: str = "input.jsonl") -> str:
    text = "\n".join(item if isinstance(item, str) else json.dumps(item) for item in lines)
    return oai.files.create(file=(name, io.BytesIO(text.encode())), purpose="batch").id


def create(oai: openai.OpenAI, lines: list[Any], **kwargs: Any) -> Batch:
    return oai.batches.create(
        input_file_id=upload(oai, lines),
        endpoint=kwargs.pop("endpoint", "/v1/chat/completions"),
        completion_window="24h",
        **kwargs,
    )


def jsonl(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(text) for text in oai.files.content(file_id).text.splitlines()]


def batch_stats(mock_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{mock_url}/_mock/batch_stats").json())


# ---- OpenAI files ---------------------------------------------------------------------------


def test_it_stores_files_in_openai_shape(oai: openai.OpenAI) -> None:
    data = b'{"custom_id": "a"}\n'
    created = oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    other = oai.files.create(file=("notes.txt", io.BytesIO(b"hi")), purpose="user_data")

    assert created.id.startswith("file-")
    assert created.object == "file"
    assert created.bytes == len(data)
    assert created.filename == "in.jsonl"
    assert created.purpose == "batch"
    assert created.status == "processed"
    # Batch files expire after 30 days by default; others are kept until deleted.
    assert created.expires_at == created.created_at + 30 * 24 * 3600
    assert other.expires_at is None
    assert oai.files.retrieve(created.id) == created
    assert oai.files.content(created.id).content == data
    assert [f.id for f in oai.files.list()] == [other.id, created.id]
    assert [f.id for f in oai.files.list(purpose="batch")] == [created.id]
    assert [f.id for f in oai.files.list(order="asc", limit=1)] == [created.id, other.id]

    deleted = oai.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError) as info:
        oai.files.retrieve(created.id)
    assert info.value.body == {
        "message": f"No such File object: {created.id}",
        "type": "invalid_request_error",
        "param": "id",
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        oai.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        oai.files.delete(created.id)


def test_it_refuses_a_bad_purpose_and_a_batch_file_that_is_not_jsonl(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.files.create(file=("in.jsonl", io.BytesIO(b"{}")), purpose="training")  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "purpose"
    assert info.value.body["code"] == "invalid_value"

    with pytest.raises(openai.BadRequestError) as info:
        oai.files.create(file=("in.csv", io.BytesIO(b"{}")), purpose="batch")
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == "Invalid file format for Batch API. Must be .jsonl"


def test_it_evicts_the_oldest_files_beyond_its_cap() -> None:
    store = BatchApi(lambda path, request: (200, b"{}"), {})
    first = store.store_file("a.jsonl", "batch", b"x")
    for _ in range(MAX_FILES):
        store.store_file("b.jsonl", "batch", b"y")

    assert len(store.files) == MAX_FILES
    assert first.id not in store.files
    assert store.file_bytes == MAX_FILES


# ---- OpenAI batches -------------------------------------------------------------------------


def test_it_moves_a_batch_one_state_per_get_and_answers_lines_as_live_calls(
    oai: openai.OpenAI, mock_url: str
) -> None:
    other: Any = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Another one"}]}
    batch = create(oai, [line("a", CHAT), line("b", other)], metadata={"job": "nightly"})

    assert batch.id.startswith("batch_")
    assert batch.object == "batch"
    assert batch.status == "validating"
    assert batch.endpoint == "/v1/chat/completions"
    assert batch.completion_window == "24h"
    assert batch.metadata == {"job": "nightly"}
    assert batch.expires_at == batch.created_at + 24 * 3600
    states = [oai.batches.retrieve(batch.id) for _ in range(4)]
    assert [b.status for b in states] == ["in_progress", "finalizing", "completed", "completed"]
    assert states[0].request_counts is not None
    assert states[0].request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 0}
    assert states[1].output_file_id is None
    done = states[2]
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
    assert done.model == "mock-gpt"
    assert done.error_file_id is None
    assert None not in (done.in_progress_at, done.finalizing_at, done.completed_at)
    assert oai.files.retrieve(str(done.output_file_id)).purpose == "batch_output"

    results = jsonl(oai, done.output_file_id)
    assert [r["custom_id"] for r in results] == ["a", "b"]
    # The raw live bodies: the SDK's model_dump would add fields the wire never had.
    live = [httpx.post(f"{mock_url}/v1/chat/completions", json=b).json() for b in (CHAT, other)]
    for result, answer in zip(results, live, strict=True):
        assert result["id"].startswith("batch_req_")
        assert result["error"] is None
        assert result["response"]["status_code"] == 200
        assert result["response"]["request_id"].startswith("req_")
        body = result["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"] == answer["choices"]
        assert body["usage"] == answer["usage"]
    assert done.usage is not None
    prompt = sum(a["usage"]["prompt_tokens"] for a in live)
    completion = sum(a["usage"]["completion_tokens"] for a in live)
    assert prompt > 0 and completion > 0
    assert done.usage.model_dump() == {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
    # Batch lines are not live calls: the live counters saw only the two calls above.
    assert httpx.get(f"{mock_url}/_mock/stats").json()["by_model"] == {"mock-gpt": 2}
    assert batch_stats(mock_url)["lines_by_model"] == {"mock-gpt": 2}


def test_it_fails_lines_whose_model_asks_for_an_error(oai: openai.OpenAI) -> None:
    lines = [
        line("ok", CHAT),
        line("boom", {**CHAT, "model": "mock-gpt;status=500"}),
        line(
            "policy",
            {**CHAT, "model": "mock-gpt;status=400;error_code=content_policy_violation"},
        ),
        line("no-messages", {"model": "mock-gpt"}),
    ]
    batch = create(oai, lines, metadata={"mock_advance": "instant"})
    done = oai.batches.retrieve(batch.id)

    assert done.status == "completed"
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert [r["custom_id"] for r in jsonl(oai, done.output_file_id)] == ["ok"]
    errors = {r["custom_id"]: r for r in jsonl(oai, done.error_file_id)}
    assert list(errors) == ["boom", "policy", "no-messages"]
    assert errors["boom"]["error"] is None
    assert errors["boom"]["response"]["status_code"] == 500
    assert errors["boom"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["policy"]["response"]["status_code"] == 400
    assert errors["policy"]["response"]["body"]["error"]["code"] == "content_policy_violation"
    assert errors["no-messages"]["response"]["status_code"] == 400
    assert errors["no-messages"]["response"]["body"]["error"]["param"] == "messages"


def test_it_sums_cached_and_reasoning_tokens_into_batch_usage(
    oai: openai.OpenAI, mock_url: str
) -> None:
    body: Any = {**CHAT, "model": "mock-reasoner;cached_tokens=3"}
    batch = create(oai, [line("a", body), line("b", body)], metadata={"mock_advance": "instant"})
    done = oai.batches.retrieve(batch.id)

    live = httpx.post(f"{mock_url}/v1/chat/completions", json=body).json()["usage"]
    assert live["completion_tokens_details"]["reasoning_tokens"] > 0
    assert [r["response"]["body"]["usage"] for r in jsonl(oai, done.output_file_id)] == [live] * 2
    assert done.usage is not None
    assert done.usage.model_dump() == {
        "input_tokens": 2 * live["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 6},
        "output_tokens": 2 * live["completion_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": 2 * live["completion_tokens_details"]["reasoning_tokens"]
        },
        "total_tokens": 2 * live["total_tokens"],
    }


def test_it_runs_embedding_batches_with_live_usage(oai: openai.OpenAI) -> None:
    body: Any = {"model": "mock-embed", "input": ["one", "two two two"]}
    batch = create(
        oai, [line("e", body, "/v1/embeddings")], endpoint="/v1/embeddings", metadata=None
    )
    for _ in range(3):
        done = oai.batches.retrieve(batch.id)

    live = oai.embeddings.create(**body)
    [result] = jsonl(oai, done.output_file_id)
    assert result["response"]["body"]["usage"] == live.usage.model_dump()
    assert result["response"]["body"]["data"][1]["embedding"] == live.data[1].embedding
    assert done.usage is not None
    assert done.usage.input_tokens == live.usage.prompt_tokens
    assert done.usage.output_tokens == 0


def test_it_fails_a_batch_whose_input_file_is_invalid(oai: openai.OpenAI) -> None:
    lines = [
        line("a", CHAT),
        "{not json",
        line("a", CHAT),
        line("c", CHAT, "/v1/embeddings"),
        {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions"},
        line("e", {**CHAT, "model": "mock-gpt-mini"}),
    ]
    batch = create(oai, lines)
    failed = oai.batches.retrieve(batch.id)

    assert failed.status == "failed"
    assert failed.failed_at is not None
    assert failed.in_progress_at is None
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [
        ("invalid_json_line", 2, None),
        ("duplicate_custom_id", 3, "custom_id"),
        ("url_mismatch", 4, "url"),
        ("missing_required_parameter", 5, "body"),
        ("model_mismatch", 6, "body.model"),
    ]
    assert failed.errors.data[0].message == "This line is not parseable as valid JSON."
    assert oai.batches.retrieve(batch.id).status == "failed"

    empty = create(oai, [])
    assert empty.id != batch.id
    failed = oai.batches.retrieve(empty.id)
    assert failed.errors is not None and failed.errors.data is not None
    assert [e.code for e in failed.errors.data] == ["empty_file"]


def test_it_expires_a_batch_keeping_the_lines_done_in_time(oai: openai.OpenAI) -> None:
    lines = [line(f"r{n}", CHAT) for n in range(3)]
    batch = create(oai, lines, metadata={"mock_expire": "1", "mock_done": "1"})

    states = [oai.batches.retrieve(batch.id).status for _ in range(2)]
    assert states == ["in_progress", "expired"]
    expired = oai.batches.retrieve(batch.id)
    assert expired.status == "expired"
    assert expired.expired_at is not None and expired.completed_at is None
    assert expired.request_counts is not None
    # Cut-off lines are neither completed nor failed requests; they are in the error file.
    assert expired.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 0}
    assert [r["custom_id"] for r in jsonl(oai, expired.output_file_id)] == ["r0"]
    assert jsonl(oai, expired.error_file_id)[0]["response"] is None
    assert [(r["custom_id"], r["error"]) for r in jsonl(oai, expired.error_file_id)] == [
        (
            f"r{n}",
            {
                "code": "batch_expired",
                "message": (
                    "This request could not be executed before the completion window expired."
                ),
            },
        )
        for n in (1, 2)
    ]


def test_it_cancels_a_batch_and_refuses_to_cancel_it_twice(
    oai: openai.OpenAI, mock_url: str
) -> None:
    batch = create(oai, [line("a", CHAT), line("b", CHAT)], metadata={"mock_advance": "manual"})
    assert oai.batches.retrieve(batch.id).status == "validating"

    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    cancelled = oai.batches.retrieve(batch.id)
    assert cancelled.status == "cancelling"  # manual: GETs do not move it
    advanced = httpx.post(f"{mock_url}/_mock/batches/{batch.id}/advance")
    assert advanced.json()["status"] == "cancelled"
    cancelled = oai.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled"
    assert cancelled.cancelled_at is not None
    # Cancelled while validating: nothing was read or run.
    assert cancelled.request_counts is not None
    assert cancelled.request_counts.total == 0
    assert cancelled.output_file_id is None and cancelled.error_file_id is None

    with pytest.raises(openai.ConflictError) as info:
        oai.batches.cancel(batch.id)
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == "Cannot cancel a batch with status 'cancelled'."


def test_it_cancels_an_in_progress_batch_with_cut_off_lines(
    oai: openai.OpenAI, mock_url: str
) -> None:
    batch = oai.batches.create(
        input_file_id=upload(oai, [line("a", CHAT), line("b", CHAT)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"x-mock-batch-done": "1"},
    )
    assert oai.batches.retrieve(batch.id).status == "in_progress"
    assert oai.batches.cancel(batch.id).status == "cancelling"
    cancelled = oai.batches.retrieve(batch.id)

    assert cancelled.status == "cancelled"
    assert cancelled.request_counts is not None
    assert cancelled.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 0}
    assert [r["custom_id"] for r in jsonl(oai, cancelled.output_file_id)] == ["a"]
    [cut] = jsonl(oai, cancelled.error_file_id)
    assert (cut["custom_id"], cut["error"]["code"]) == ("b", "batch_cancelled")
    assert batch_stats(mock_url)["lines_by_model"] == {"mock-gpt": 1}


def test_it_takes_batch_controls_from_the_first_lines_model(oai: openai.OpenAI) -> None:
    body = {**CHAT, "model": "mock-gpt;batch_advance=instant;batch_expire=1;batch_done=1"}
    batch = create(oai, [line("a", body), line("b", CHAT)])
    expired = oai.batches.retrieve(batch.id)

    assert expired.status == "expired"
    assert expired.request_counts is not None
    assert expired.request_counts.completed == 1
    [result] = jsonl(oai, expired.output_file_id)
    assert result["response"]["body"]["model"] == body["model"]


def test_it_expires_a_batch_on_request(oai: openai.OpenAI, mock_url: str) -> None:
    batch = create(oai, [line("a", CHAT)], metadata={"mock_advance": "manual"})
    response = httpx.post(f"{mock_url}/_mock/batches/{batch.id}/expire")

    assert response.status_code == 200
    assert response.json()["status"] == "expired"
    assert oai.batches.retrieve(batch.id).status == "expired"
    missing = httpx.post(f"{mock_url}/_mock/batches/batch_nope/expire")
    assert missing.status_code == 404


def test_it_counts_creates_per_input_file_and_pages_batches(
    oai: openai.OpenAI, mock_url: str
) -> None:
    file_id = upload(oai, [line("a", CHAT)])
    ids = [
        oai.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    other = create(oai, [line("a", CHAT)])

    stats = batch_stats(mock_url)
    assert stats["batch_creates"] == 4
    assert stats["file_uploads"] == 2
    assert stats["creates_by_input_file"] == {file_id: 3, other.input_file_id: 1}
    newest_first = [other.id, *reversed(ids)]
    page = oai.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more is True
    assert [b.id for b in oai.batches.list(limit=2)] == newest_first  # the SDK follows `after`
    assert [b.id for b in oai.batches.list(after=ids[1]).data] == [ids[0]]

    httpx.post(f"{mock_url}/_mock/reset").raise_for_status()
    assert batch_stats(mock_url)["creates_by_input_file"] == {}
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve(other.id)


def test_it_refuses_bad_batch_requests(oai: openai.OpenAI) -> None:
    file_id = upload(oai, [line("a", CHAT)])
    with pytest.raises(openai.NotFoundError) as info:
        oai.batches.retrieve("batch_missing")
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == "No batch found with id 'batch_missing'."
    with pytest.raises(openai.NotFoundError):
        oai.batches.cancel("batch_missing")
    with pytest.raises(openai.NotFoundError) as info:
        oai.batches.create(
            input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "input_file_id"

    bad: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "/v1/moderations", "completion_window": "24h"}, "endpoint"),
        ({"endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window"),
        (
            {
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"k": 1},
            },
            "metadata",
        ),
    ]
    for params, param in bad:
        with pytest.raises(openai.BadRequestError) as bad_info:
            oai.batches.create(input_file_id=file_id, **params)
        assert isinstance(bad_info.value.body, dict)
        assert bad_info.value.body["param"] == param

    user_file = oai.files.create(file=("x.txt", io.BytesIO(b"{}")), purpose="user_data").id
    with pytest.raises(openai.BadRequestError):
        oai.batches.create(
            input_file_id=user_file, endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_it_serves_azure_openai_batches_under_the_openai_prefix(mock_url: str) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=mock_url, api_key="x", api_version="2024-10-21", max_retries=0
    )
    file_id = azure.files.create(
        file=("in.jsonl", io.BytesIO(json.dumps(line("a", CHAT, "/chat/completions")).encode())),
        purpose="batch",
    ).id
    batch = azure.batches.create(
        input_file_id=file_id,
        endpoint="/chat/completions",  # type: ignore[arg-type]
        completion_window="24h",
        extra_headers={"x-mock-batch-advance": "instant"},
    )
    done = azure.batches.retrieve(batch.id)

    assert done.status == "completed"
    assert done.endpoint == "/chat/completions"
    [result] = [json.loads(t) for t in azure.files.content(str(done.output_file_id)).iter_lines()]
    assert result["response"]["body"]["object"] == "chat.completion"


# ---- Anthropic message batches --------------------------------------------------------------


def test_it_ends_a_message_batch_with_live_messages(
    claude: anthropic.Anthropic, mock_url: str
) -> None:
    other: Any = {**CLAUDE, "messages": [{"role": "user", "content": "Something else entirely"}]}
    batch = claude.messages.batches.create(
        requests=[{"custom_id": "a", "params": CLAUDE}, {"custom_id": "b", "params": other}]
    )

    assert batch.id.startswith("msgbatch_")
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.model_dump() == {
        "processing": 2,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch.results_url is None and batch.ended_at is None
    assert (batch.expires_at - batch.created_at).total_seconds() == 24 * 3600
    # Raw GET: the SDK's results() retrieves the batch first, which would advance it.
    early = httpx.get(f"{mock_url}/v1/messages/batches/{batch.id}/results")
    assert early.status_code == 404
    assert early.json()["error"]["type"] == "not_found_error"

    ended = claude.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at is not None
    assert ended.request_counts.succeeded == 2 and ended.request_counts.processing == 0
    assert ended.results_url == f"{mock_url}/v1/messages/batches/{batch.id}/results"

    results = list(claude.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == ["a", "b"]
    for result, params in zip(results, [CLAUDE, other], strict=True):
        assert result.result.type == "succeeded"
        live = claude.messages.create(**params)
        message = result.result.message
        assert message.content == live.content
        assert message.usage.service_tier == "batch"
        assert message.usage.model_dump(exclude={"service_tier"}) == live.usage.model_dump(
            exclude={"service_tier"}
        )
    assert batch_stats(mock_url)["lines_by_model"] == {"mock-claude": 2}


def test_it_reports_errored_requests_in_anthropics_shape(claude: anthropic.Anthropic) -> None:
    batch = claude.messages.batches.create(
        requests=[
            {"custom_id": "ok", "params": CLAUDE},
            {"custom_id": "busy", "params": claude_params(model="mock-claude;status=529")},
            {"custom_id": "bad", "params": NO_MAX_TOKENS},
        ]
    )
    ended = claude.messages.batches.retrieve(batch.id)
    assert ended.request_counts.model_dump() == {
        "processing": 0,
        "succeeded": 1,
        "errored": 2,
        "canceled": 0,
        "expired": 0,
    }

    raw = httpx.get(str(ended.results_url))
    lines = [json.loads(text) for text in raw.text.splitlines()]
    assert [(r["custom_id"], r["result"]["type"]) for r in lines] == [
        ("ok", "succeeded"),
        ("busy", "errored"),
        ("bad", "errored"),
    ]
    busy = lines[1]["result"]["error"]
    assert busy["type"] == "error"
    assert busy["error"]["type"] == "overloaded_error"
    assert lines[2]["result"]["error"]["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }


def test_it_cancels_a_message_batch(claude: anthropic.Anthropic) -> None:
    batch = claude.messages.batches.create(
        requests=[{"custom_id": f"r{n}", "params": CLAUDE} for n in range(3)],
        extra_headers={"x-mock-batch-done": "1"},
    )
    canceling = claude.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None

    ended = claude.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.request_counts.canceled == 2 and ended.request_counts.succeeded == 1
    results = list(claude.messages.batches.results(batch.id))
    assert [r.result.type for r in results] == ["succeeded", "canceled", "canceled"]
    with pytest.raises(anthropic.APIStatusError) as info:
        claude.messages.batches.cancel(batch.id)
    assert info.value.status_code == 409


def test_it_expires_message_batches_by_control(claude: anthropic.Anthropic, mock_url: str) -> None:
    manual = claude.messages.batches.create(
        requests=[
            {"custom_id": "a", "params": claude_params(model="mock-claude;batch_advance=manual")}
        ]
    )
    assert claude.messages.batches.retrieve(manual.id).processing_status == "in_progress"
    expired = httpx.post(f"{mock_url}/_mock/batches/{manual.id}/expire").json()
    assert expired["processing_status"] == "ended"
    assert expired["request_counts"]["expired"] == 1
    assert [r.result.type for r in claude.messages.batches.results(manual.id)] == ["expired"]

    marked = claude.messages.batches.create(
        requests=[{"custom_id": "a", "params": CLAUDE}, {"custom_id": "b", "params": CLAUDE}],
        extra_headers={"x-mock-batch-expire": "1", "x-mock-batch-done": "1"},
    )
    claude.messages.batches.retrieve(marked.id)
    types = [r.result.type for r in claude.messages.batches.results(marked.id)]
    assert types == ["succeeded", "expired"]


def test_it_deletes_only_ended_message_batches(claude: anthropic.Anthropic) -> None:
    batch = claude.messages.batches.create(requests=[{"custom_id": "a", "params": CLAUDE}])
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.batches.delete(batch.id)
    claude.messages.batches.retrieve(batch.id)

    deleted = claude.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.batches.retrieve(batch.id)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": f"Message batch {batch.id} not found."},
        "request_id": info.value.body["request_id"],  # type: ignore[index]
    }


def test_it_refuses_bad_message_batches(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.batches.create(requests=[])
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.batches.create(
            requests=[{"custom_id": "a", "params": CLAUDE}, {"custom_id": "a", "params": CLAUDE}]
        )
    assert "duplicate custom_id 'a'" in info.value.message
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.batches.create(requests=[{"custom_id": "no spaces", "params": CLAUDE}])
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve("msgbatch_missing")


def test_it_lists_message_batches_and_counts_creates(
    claude: anthropic.Anthropic, mock_url: str
) -> None:
    ids = [
        claude.messages.batches.create(requests=[{"custom_id": f"r{n}", "params": CLAUDE}]).id
        for n in range(3)
    ]
    page = claude.messages.batches.list(limit=2)

    assert [b.id for b in page.data] == [ids[2], ids[1]]
    assert (page.has_more, page.first_id, page.last_id) == (True, ids[2], ids[1])
    assert [b.id for b in claude.messages.batches.list(limit=2)] == list(reversed(ids))
    stats = batch_stats(mock_url)
    assert stats["message_batch_creates"] == 3
    assert stats["creates_by_custom_id"] == {"r0": 1, "r1": 1, "r2": 1}
