"""The Batch API (OpenAI-compatible): creating batches, running their lines, results.

Creation validates the whole input file at once; any bad line fails the batch with
per-line errors in `errors.data` (as OpenAI does), otherwise one BatchLine row per
request is written and a worker task is queued.

Running: a worker claims lines by compare-and-set under a short lease (renewed while
it works), never more than GATEWAY_BATCH_TEAM_CONCURRENCY of a team's lines in flight
across all workers. Each line goes through the same flow as a live request
(gateway.proxy: admission against budgets and rate limits, routing, retries and
fallbacks, one ledger row per attempt, settling), with the team's markup reduced by
GATEWAY_BATCH_DISCOUNT_PERCENT, and a ledger request id derived from (batch, custom_id).
A line that runs again (its worker was killed mid-line) keeps its request id and
numbers its attempts on from the rows the ledger already holds, so every provider
call has its own row (the ledger's (request_id, attempt) is unique and a repeat
would be dropped) and the rerun is admitted and settled like any request. If the
first run was already answered and billed, the rerun's provider call is recorded at
its list cost but charged nothing: the line is charged once.
Results are stored on the line by compare-and-set on the claim, so exactly one run
counts. When no line is left, the output and error files are written and the batch
completes (or expires, or is cancelled).

A worker that dies leaves lines whose lease lapses; the next worker that starts, or
the periodic sweep, finds the batch's stale heartbeat and resumes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import Case, Count, F, Max, PositiveSmallIntegerField, Q, When
from django.http import HttpResponse
from django.utils import timezone

from accounts.auth import KeyPrincipal, _load
from accounts.models import KeySecret
from billing import admission
from billing.models import LedgerEntry, LedgerStatus
from core import tasks
from core.db import run_db_atomic
from core.errors import GatewayError, invalid_request
from gateway import dialects, files, proxy, validation
from gateway.models import Batch, BatchLine, BatchLineStatus, BatchStatus, FilePurpose
from gateway.routing import RoutingTable, routing_tables

logger = logging.getLogger(__name__)
T = TypeVar("T")

ENDPOINTS: dict[str, dialects.Endpoint] = {
    "/v1/chat/completions": dialects.CHAT,
    "/v1/embeddings": dialects.EMBEDDINGS,
    "/v1/completions": dialects.COMPLETIONS,
    "/v1/responses": dialects.RESPONSES,
}
WINDOWS = {"24h": timedelta(hours=24)}
ACTIVE = (
    BatchStatus.VALIDATING,
    BatchStatus.IN_PROGRESS,
    BatchStatus.FINALIZING,
    BatchStatus.CANCELLING,
)
TERMINAL = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
MAX_REPORTED_ERRORS = 1000
MAX_LAPSES = 3
# Refusals a line waits out (it is put back) instead of failing on.
_RETRYABLE_CODES = {
    "rate_limit_exceeded",
    "budget_service_unavailable",
    "database_unavailable",
    "no_deployment_available",
}
LAPSED_ERROR = GatewayError(
    f"This request was interrupted {MAX_LAPSES} times (the worker running it stopped); "
    "it was not retried again.",
    500,
    "server_error",
    "batch_line_interrupted",
)
EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def batch_not_found(batch_id: str) -> GatewayError:
    return GatewayError(
        f"No batch found with id '{batch_id}'.",
        404,
        "invalid_request_error",
        "batch_not_found",
        "id",
    )


def line_request_id(batch_public_id: str, custom_id: str) -> str:
    digest = hashlib.sha256(f"{batch_public_id}\x00{custom_id}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"


# --- creation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedLine:
    line_no: int
    custom_id: str
    body: dict[str, Any]


def _line_error(code: str, message: str, line: int, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_input(
    content: bytes, *, endpoint: str, principal: KeyPrincipal, table: RoutingTable
) -> tuple[list[ParsedLine], list[dict[str, Any]]]:
    """Every request of an input file, or the per-line errors that fail the batch."""
    lines: list[ParsedLine] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], [_line_error("invalid_file_format", "The file is not UTF-8 text.", 0)]
    for number, raw in enumerate(text.splitlines(), start=1):
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
        if not raw.strip():
            continue

        def fail(code: str, message: str, param: str | None = None, n: int = number) -> None:
            errors.append(_line_error(code, message, n, param))

        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            fail("invalid_json_line", f"Line {number} is not valid JSON ({exc.msg}).")
            continue
        if not isinstance(item, dict):
            fail("invalid_json_line", f"Line {number} must be a JSON object.")
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            fail("missing_custom_id", f"Line {number} has no 'custom_id' string.", "custom_id")
            continue
        if len(custom_id) > 512:
            fail("invalid_custom_id", "custom_id is longer than 512 characters.", "custom_id")
            continue
        if custom_id in seen:
            fail(
                "duplicate_custom_id",
                f"custom_id {custom_id!r} is also used on line {seen[custom_id]}; "
                "each request needs its own.",
                "custom_id",
            )
            continue
        seen[custom_id] = number
        if item.get("method") != "POST":
            fail("invalid_method", "'method' must be \"POST\".", "method")
            continue
        if item.get("url") != endpoint:
            fail(
                "invalid_url",
                f"'url' is {item.get('url')!r} but this batch's endpoint is {endpoint!r}; "
                "every line must use the batch's endpoint.",
                "url",
            )
            continue
        body = item.get("body")
        if not isinstance(body, dict):
            fail("invalid_body", "'body' must be a JSON object (the request).", "body")
            continue
        model = body.get("model")
        if not isinstance(model, str) or not model:
            fail("missing_model", "'body.model' is required.", "body.model")
            continue
        if body.get("stream"):
            fail("invalid_body", "Streaming is not supported in a batch.", "body.stream")
            continue
        try:
            proxy.plan(principal, table, model, None)
        except GatewayError as exc:
            fail(exc.code or "invalid_model", exc.message, "body.model")
            continue
        lines.append(ParsedLine(number, custom_id, body))
    if not lines and not errors:
        errors.append(_line_error("empty_file", "The input file has no requests.", 0))
    if len(lines) > settings.GATEWAY_BATCH_MAX_LINES:
        errors.append(
            _line_error(
                "too_many_requests",
                f"The file has {len(lines)} requests; a batch may have at most "
                f"{settings.GATEWAY_BATCH_MAX_LINES}.",
                0,
            )
        )
    return lines, errors


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise invalid_request("'metadata' must be an object of at most 16 pairs.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise invalid_request(
                "'metadata' keys are at most 64 characters and values strings of at most 512.",
                param="metadata",
            )
    return dict(metadata)


def batch_create(
    *,
    principal: KeyPrincipal,
    table: RoutingTable,
    input_file_id: Any,
    endpoint: Any,
    completion_window: Any,
    metadata: Any = None,
) -> Batch:
    if not isinstance(input_file_id, str) or not input_file_id:
        raise invalid_request("'input_file_id' is required.", param="input_file_id")
    if endpoint not in ENDPOINTS:
        raise invalid_request(
            f"Unsupported endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}.",
            param="endpoint",
        )
    if completion_window not in WINDOWS:
        raise invalid_request("'completion_window' must be \"24h\".", param="completion_window")
    meta = _check_metadata(metadata)
    source = files.file_get(principal=principal, file_id=input_file_id)
    if source.purpose != FilePurpose.BATCH:
        raise invalid_request(
            f"File {input_file_id} has purpose {source.purpose!r}; a batch's input file "
            "must be uploaded with purpose 'batch'.",
            param="input_file_id",
        )
    lines, errors = parse_input(
        files.file_read(source), endpoint=endpoint, principal=principal, table=table
    )
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.create(
            public_id="batch_" + secrets.token_hex(12),
            team_id=principal.team_id,
            key_id=principal.key_id,
            owner_id=principal.owner_id,
            endpoint=endpoint,
            completion_window=completion_window,
            input_file=source,
            status=BatchStatus.FAILED if errors else BatchStatus.IN_PROGRESS,
            errors=errors or None,
            metadata=meta,
            total=0 if errors else len(lines),
            expires_at=now + WINDOWS[completion_window],
            failed_at=now if errors else None,
            in_progress_at=None if errors else now,
            heartbeat_at=now,
        )
        if not errors:
            BatchLine.objects.bulk_create(
                [
                    BatchLine(
                        batch=batch,
                        line_no=line.line_no,
                        custom_id=line.custom_id,
                        body=line.body,
                        request_id=line_request_id(batch.public_id, line.custom_id),
                    )
                    for line in lines
                ],
                batch_size=1000,
            )
            batch_id = batch.id
            transaction.on_commit(lambda: _enqueue(batch_id))
    return batch


def _enqueue(batch_id: int, countdown: float | None = None) -> None:
    tasks.send("gateway.batch_run", batch_id, countdown=countdown)


def batch_get(*, principal: KeyPrincipal, batch_id: str) -> Batch:
    batch = (
        Batch.objects.select_related("input_file", "output_file", "error_file")
        .filter(files.visible_q(principal))
        .filter(public_id=batch_id)
        .first()
    )
    if batch is None:
        raise batch_not_found(batch_id)
    return batch


def batch_list(
    *, principal: KeyPrincipal, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    visible = Batch.objects.filter(files.visible_q(principal))
    rows = visible.select_related("input_file", "output_file", "error_file")
    if after:
        anchor = visible.filter(public_id=after).first()
        if anchor is not None:
            rows = rows.filter(id__lt=anchor.id)
    page = list(rows.order_by("-id")[: limit + 1])
    return page[:limit], len(page) > limit


def batch_cancel(*, principal: KeyPrincipal, batch_id: str) -> Batch:
    now = timezone.now()
    with transaction.atomic():
        batch = (
            Batch.objects.select_for_update()
            .filter(files.visible_q(principal))
            .filter(public_id=batch_id)
            .first()
        )
        if batch is None:
            raise batch_not_found(batch_id)
        if batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            batch.status = BatchStatus.CANCELLING
            batch.cancelling_at = now
            batch.save(update_fields=["status", "cancelling_at"])
            # Lines not started never will be; those running finish and are kept.
            BatchLine.objects.filter(batch=batch, status=BatchLineStatus.PENDING).update(
                status=BatchLineStatus.CANCELLED, finished_at=now
            )
            pk = batch.id
            transaction.on_commit(lambda: _enqueue(pk))
        elif batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            raise GatewayError(
                f"Cannot cancel a batch with status '{batch.status}'.",
                409,
                "invalid_request_error",
                "batch_not_cancellable",
            )
    return batch_get(principal=principal, batch_id=batch_id)


# --- the OpenAI shapes ---------------------------------------------------------------------------


def _ts(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def batch_out(batch: Batch) -> dict[str, Any]:
    return {
        "id": batch.public_id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file.public_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file.public_id if batch.output_file else None,
        "error_file_id": batch.error_file.public_id if batch.error_file else None,
        "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "metadata": batch.metadata,
    }


# --- running: database steps (sync, called through run_db) ---------------------------------------


@dataclass(frozen=True)
class Job:
    batch_id: int
    public_id: str
    team_id: int
    key_id: int
    endpoint: str
    status: str


@dataclass(frozen=True)
class Claimed:
    id: int
    custom_id: str
    body: dict[str, Any]
    request_id: str
    tries: int


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    retry_after: float | None = None  # put the line back instead of failing it

    @property
    def succeeded(self) -> bool:
        return self.status_code == 200


def _lease() -> timedelta:
    return timedelta(seconds=settings.GATEWAY_BATCH_LEASE_SECONDS)


def _job(batch_id: int) -> Job | None:
    batch = Batch.objects.filter(id=batch_id).first()
    if batch is None:
        return None
    return Job(batch.id, batch.public_id, batch.team_id, batch.key_id, batch.endpoint, batch.status)


def _claim(batch_id: int, token: str, want: int) -> list[Claimed]:
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.select_for_update().filter(id=batch_id).first()
        if batch is None or batch.status != BatchStatus.IN_PROGRESS or now >= batch.expires_at:
            return []
        # Serialise claims per team: lock the team's active batches, in id order.
        list(
            Batch.objects.select_for_update()
            .filter(team_id=batch.team_id, status__in=ACTIVE)
            .order_by("id")
            .values_list("id", flat=True)
        )
        running = BatchLine.objects.filter(
            batch__team_id=batch.team_id, status=BatchLineStatus.RUNNING, lease_until__gt=now
        ).count()
        free = min(want, settings.GATEWAY_BATCH_TEAM_CONCURRENCY - running)
        if free <= 0:
            return []
        poisoned = BatchLine.objects.filter(
            batch_id=batch_id,
            status=BatchLineStatus.RUNNING,
            lease_until__lte=now,
            lapses__gte=MAX_LAPSES,
        ).update(
            status=BatchLineStatus.FAILED,
            status_code=500,
            response_body=LAPSED_ERROR.openai_body(),
            finished_at=now,
            lease_until=None,
        )
        if poisoned:
            Batch.objects.filter(id=batch_id).update(failed=F("failed") + poisoned)
        ids = list(
            BatchLine.objects.filter(batch_id=batch_id)
            .filter(
                Q(status=BatchLineStatus.PENDING, not_before__isnull=True)
                | Q(status=BatchLineStatus.PENDING, not_before__lte=now)
                # A claim that lapsed: its worker died (or stalled) mid-line.
                | Q(status=BatchLineStatus.RUNNING, lease_until__lte=now)
            )
            .order_by("line_no")
            .values_list("id", flat=True)[:free]
        )
        if not ids:
            return []
        BatchLine.objects.filter(id__in=ids).update(
            lapses=Case(
                When(status=BatchLineStatus.RUNNING, then=F("lapses") + 1),
                default=F("lapses"),
                output_field=PositiveSmallIntegerField(),
            ),
            status=BatchLineStatus.RUNNING,
            claim_token=token,
            lease_until=now + _lease(),
            tries=F("tries") + 1,
        )
        Batch.objects.filter(id=batch_id).update(heartbeat_at=now)
        return [
            Claimed(row.id, row.custom_id, row.body, row.request_id, row.tries)
            for row in BatchLine.objects.filter(id__in=ids).order_by("line_no")
        ]


def _renew(batch_id: int, token: str, line_ids: list[int]) -> None:
    now = timezone.now()
    if line_ids:
        BatchLine.objects.filter(
            id__in=line_ids, claim_token=token, status=BatchLineStatus.RUNNING
        ).update(lease_until=now + _lease())
    Batch.objects.filter(id=batch_id, status__in=ACTIVE).update(heartbeat_at=now)


def _store(batch_id: int, line_id: int, token: str, outcome: Outcome) -> bool:
    now = timezone.now()
    mine = BatchLine.objects.filter(id=line_id, claim_token=token, status=BatchLineStatus.RUNNING)
    with transaction.atomic():
        if outcome.retry_after is not None:
            return bool(
                mine.update(
                    status=BatchLineStatus.PENDING,
                    claim_token="",
                    lease_until=None,
                    not_before=now + timedelta(seconds=outcome.retry_after),
                )
            )
        stored = mine.update(
            status=BatchLineStatus.SUCCEEDED if outcome.succeeded else BatchLineStatus.FAILED,
            status_code=outcome.status_code,
            response_body=outcome.body,
            error=outcome.error,
            finished_at=now,
            lease_until=None,
        )
        if stored:
            counter = "completed" if outcome.succeeded else "failed"
            Batch.objects.filter(id=batch_id).update(**{counter: F(counter) + 1}, heartbeat_at=now)
    return bool(stored)


def _ledger_so_far(request_id: str) -> tuple[int, bool]:
    """The line's last attempt number in the ledger, and whether one was answered."""
    found = LedgerEntry.objects.filter(request_id=request_id).aggregate(
        last=Max("attempt"), answered=Count("id", filter=Q(status=LedgerStatus.SUCCESS))
    )
    return found["last"] or 0, bool(found["answered"])


def _principal(key_id: int) -> KeyPrincipal | None:
    # The key's current secret (the one without an expiry first) identifies it to auth.
    secret = (
        KeySecret.objects.filter(key_id=key_id)
        .order_by(F("expires_at").desc(nulls_first=True), "-created_at")
        .first()
    )
    return _load(secret.secret_hash) if secret is not None else None


def _line_json(line: BatchLine) -> bytes:
    if line.status == BatchLineStatus.EXPIRED:
        item: dict[str, Any] = {
            "id": line.request_id,
            "custom_id": line.custom_id,
            "response": None,
            "error": line.error or EXPIRED_ERROR,
        }
    elif line.error is not None and line.status_code is None:
        item = {
            "id": line.request_id,
            "custom_id": line.custom_id,
            "response": None,
            "error": line.error,
        }
    else:
        item = {
            "id": line.request_id,
            "custom_id": line.custom_id,
            "response": {
                "status_code": line.status_code,
                "request_id": line.request_id,
                "body": line.response_body,
            },
            "error": None,
        }
    return orjson.dumps(item) + b"\n"


def _finalize(batch_id: int) -> str:
    """Finish the batch if no line is left: "done", "elsewhere" (others run lines), "waiting"."""
    from billing import webhooks

    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.select_for_update().filter(id=batch_id).first()
        if batch is None or batch.status in TERMINAL:
            return "done"
        lines = BatchLine.objects.filter(batch=batch)
        if batch.status == BatchStatus.IN_PROGRESS and now >= batch.expires_at:
            lines.filter(status=BatchLineStatus.PENDING).update(
                status=BatchLineStatus.EXPIRED, error=EXPIRED_ERROR, finished_at=now
            )
        if batch.status != BatchStatus.FINALIZING:
            running = lines.filter(status=BatchLineStatus.RUNNING)
            if running.filter(lease_until__gt=now).exists():
                return "elsewhere"
            if running.exists() or lines.filter(status=BatchLineStatus.PENDING).exists():
                return "waiting"
            batch.finalizing_at = now
            if batch.status == BatchStatus.IN_PROGRESS:
                batch.status = BatchStatus.FINALIZING
            batch.save(update_fields=["status", "finalizing_at"])
    # Written outside the transaction (they can be large) under names derived from the
    # batch, so a finalization that dies half-way is simply done again.
    output: list[bytes] = []
    errors: list[bytes] = []
    for line in BatchLine.objects.filter(batch_id=batch_id).order_by("line_no").iterator(2000):
        if line.status == BatchLineStatus.SUCCEEDED:
            output.append(_line_json(line))
        elif line.status in (BatchLineStatus.FAILED, BatchLineStatus.EXPIRED):
            errors.append(_line_json(line))
    out_file = (
        files.file_write_result(
            team_id=batch.team_id,
            key_id=batch.key_id,
            owner_id=batch.owner_id,
            seed=f"{batch.public_id}:output",
            filename=f"{batch.public_id}_output.jsonl",
            content=b"".join(output),
        )
        if output
        else None
    )
    err_file = (
        files.file_write_result(
            team_id=batch.team_id,
            key_id=batch.key_id,
            owner_id=batch.owner_id,
            seed=f"{batch.public_id}:error",
            filename=f"{batch.public_id}_error.jsonl",
            content=b"".join(errors),
        )
        if errors
        else None
    )
    with transaction.atomic():
        batch = Batch.objects.select_for_update().get(id=batch_id)
        if batch.status in TERMINAL:
            return "done"
        now = timezone.now()
        if batch.status == BatchStatus.CANCELLING:
            batch.status, batch.cancelled_at = BatchStatus.CANCELLED, now
        elif BatchLine.objects.filter(batch=batch, status=BatchLineStatus.EXPIRED).exists():
            batch.status, batch.expired_at = BatchStatus.EXPIRED, now
        else:
            batch.status, batch.completed_at = BatchStatus.COMPLETED, now
        batch.output_file = out_file
        batch.error_file = err_file
        batch.save(
            update_fields=[
                "status",
                "cancelled_at",
                "expired_at",
                "completed_at",
                "output_file",
                "error_file",
            ]
        )
        if batch.status == BatchStatus.COMPLETED:
            webhooks.event_emit(
                team_id=batch.team_id,
                event_type="batch.completed",
                idempotency_key=f"batch.completed:{batch.public_id}",
                data={**batch_out(batch), "input_file_id": batch.input_file.public_id},
            )
    return "done"


# --- running: the lines --------------------------------------------------------------------------


def batch_principal(principal: KeyPrincipal) -> KeyPrincipal:
    """The key as a batch sees it: its team's markup with the batch discount applied."""
    discount = Decimal(str(settings.GATEWAY_BATCH_DISCOUNT_PERCENT))
    factor = (Decimal(100) + principal.markup_percent) * (Decimal(100) - discount) / Decimal(100)
    return dataclasses.replace(principal, markup_percent=factor - Decimal(100))


def _key_refusal(principal: KeyPrincipal | None) -> GatewayError | None:
    if principal is None or principal.revoked:
        return GatewayError(
            "The API key that created this batch has been revoked.", 401, code="invalid_api_key"
        )
    now = timezone.now()
    if principal.key_expires_at is not None and principal.key_expires_at <= now:
        return GatewayError(
            "The API key that created this batch has expired.", 401, code="invalid_api_key"
        )
    return None


async def run_line(
    principal: KeyPrincipal | None,
    endpoint: dialects.Endpoint,
    body: dict[str, Any],
    request_id: str,
) -> Outcome:
    """One request through the live flow: admission, attempts, ledger, settle."""
    refusal = _key_refusal(principal)
    if refusal is not None or principal is None:
        assert refusal is not None
        return Outcome(refusal.status, refusal.openai_body())
    try:
        last_attempt, answered = await run_db_atomic(_ledger_so_far, request_id)
        if answered:
            # A rerun after a crash that lost an answer already billed: the provider
            # is paid again (the row keeps its list cost) but the line is charged once.
            principal = dataclasses.replace(principal, markup_percent=Decimal(-100))
        parsed = endpoint.validate(body)
        if parsed.stream:
            raise invalid_request("Streaming is not supported in a batch.", param="stream")
        call = proxy.Call(
            request_id=request_id,
            endpoint=endpoint,
            principal=principal,
            model=parsed.model,
            body=body,
            stream=False,
            started_at=timezone.now(),
            started_mono=time.monotonic(),
            headers={},
            end_user=parsed.end_user,
            tags=validation.tags_from(None, body.get("metadata")),
        )
        call.is_batch = True
        # Attempts continue the first run's numbering: a repeated number would collide
        # with that run's row and be dropped from the ledger.
        call.attempts = last_attempt
        table = await routing_tables.get()
        chain = proxy.plan(principal, table, call.model, parsed.fallbacks)
        proxy.refuse_media_downloads(principal, endpoint, body, table, chain)
        call.prompt_tokens = endpoint.count_prompt(table.group(call.model)[0].provider_model, body)
        if answered:
            # Charged nothing (above), so there is nothing to reserve or settle.
            ticket = admission.Ticket(
                reservation_id=admission.NO_TICKET_NEEDED, amount=0, budgets=[], settled=True
            )
        else:
            ticket = await proxy.admit_call(call, table, chain)
        try:
            response = await proxy._attempts(call, table, chain, ticket)
        except BaseException:
            if not ticket.settled:
                await admission.settle(ticket, call.charged_micro_usd)
            raise
        assert isinstance(response, HttpResponse)  # batch lines never stream
        return Outcome(200, orjson.loads(response.content))
    except GatewayError as exc:
        if exc.code in _RETRYABLE_CODES:
            wait = exc.headers.get("retry-after") or "1"
            return Outcome(exc.status, exc.openai_body(), retry_after=float(wait))
        return Outcome(exc.status, exc.openai_body())


class Runner:
    """Works on one batch in this process until it is done, handed over, or the slice ends."""

    def __init__(self, batch_id: int) -> None:
        self.batch_id = batch_id
        self.token = secrets.token_hex(8)
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.principal: KeyPrincipal | None = None
        self.principal_at = 0.0

    async def _principal(self, key_id: int) -> KeyPrincipal | None:
        # Reloaded now and then, so a revocation or a budget change reaches a long batch.
        if time.monotonic() - self.principal_at > 30:
            found = await run_db_atomic(_principal, key_id)
            self.principal = batch_principal(found) if found is not None else None
            self.principal_at = time.monotonic()
        return self.principal

    async def _line(self, job: Job, line: Claimed) -> None:
        principal = await self._principal(job.key_id)
        try:
            outcome = await run_line(principal, ENDPOINTS[job.endpoint], line.body, line.request_id)
        except Exception as exc:  # a bug: the line fails visibly, the batch goes on
            logger.exception("batch %s line %s failed", job.public_id, line.custom_id)
            error = GatewayError(
                f"The gateway failed on this request ({type(exc).__name__}).", 500, "server_error"
            )
            outcome = Outcome(500, error.openai_body())
        await run_db_atomic(_store, job.batch_id, line.id, self.token, outcome)

    async def run(self) -> str:
        job = await run_db_atomic(_job, self.batch_id)
        if job is None or job.status in TERMINAL:
            return "done"
        lease = settings.GATEWAY_BATCH_LEASE_SECONDS
        started = time.monotonic()
        renewed = 0.0
        limit = settings.GATEWAY_BATCH_TEAM_CONCURRENCY
        try:
            while True:
                if time.monotonic() - renewed > lease / 3:
                    await run_db_atomic(_renew, job.batch_id, self.token, list(self.inflight))
                    renewed = time.monotonic()
                # Handing over re-enqueues; run eagerly that would nest inside this loop.
                slice_over = (
                    not settings.CELERY_TASK_ALWAYS_EAGER
                    and time.monotonic() - started > settings.GATEWAY_BATCH_SLICE_SECONDS
                )
                if not slice_over and len(self.inflight) < limit:
                    for line in await run_db_atomic(
                        _claim, job.batch_id, self.token, limit - len(self.inflight)
                    ):
                        self.inflight[line.id] = asyncio.create_task(self._line(job, line))
                if not self.inflight:
                    if slice_over:
                        _enqueue(job.batch_id)
                        return "continued"
                    state = await run_db_atomic(_finalize, job.batch_id)
                    if state in ("done", "elsewhere"):
                        return state
                    await asyncio.sleep(min(1.0, lease / 3))
                    continue
                done, _ = await asyncio.wait(
                    self.inflight.values(), timeout=0.2, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()
                self.inflight = {k: t for k, t in self.inflight.items() if not t.done()}
        finally:
            for task in self.inflight.values():
                task.cancel()


def batch_process(*, batch_id: int) -> str:
    """Work on a batch (the worker task's body). Safe to run anywhere, any number of times."""
    return run_async(Runner(batch_id).run())


def batches_resume(*, now: datetime | None = None) -> list[int]:
    """Queue every active batch whose worker stopped renewing its claims, or that expired."""
    now = now or timezone.now()
    stale = now - _lease()
    ids = list(
        Batch.objects.filter(status__in=ACTIVE)
        .filter(
            Q(heartbeat_at__isnull=True)
            | Q(heartbeat_at__lt=stale)
            | Q(status=BatchStatus.IN_PROGRESS, expires_at__lte=now)
        )
        .values_list("id", flat=True)
    )
    for batch_id in ids:
        # Claimed for a lease so that several sweeps do not queue it over and over.
        Batch.objects.filter(id=batch_id).update(heartbeat_at=now)
        _enqueue(batch_id)
    return ids


# --- one event loop per worker process -----------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_loop_pid = 0


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on this process's own long-lived loop.

    Per-loop caches (the pooled HTTP client, the Redis client) stay valid from task to
    task, which a fresh asyncio.run() per task would not give.
    """
    global _loop, _loop_pid
    if _loop is None or _loop.is_closed() or _loop_pid != os.getpid():
        _loop = asyncio.new_event_loop()
        _loop_pid = os.getpid()
    return _loop.run_until_complete(coro)
