"""Running a batch: claiming its lines, running each through the request flow, finishing.

A worker claims lines by compare-and-set under a short lease (renewed while it works),
never more than GATEWAY_BATCH_TEAM_CONCURRENCY of a team's lines in flight across all
workers. Each line goes through the same flow as a live request (gateway.flow.run:
admission against budgets and rate limits, routing, retries and fallbacks, one ledger
row per attempt, settling), with the team's markup reduced by
GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT (billing.recorder.batch_markup, 0 by default),
and a ledger request id derived from (batch, custom_id). Batches sent to a provider's
own batch API are not run here but by gateway.native_batches.
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
import logging
import os
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, PositiveSmallIntegerField, Q, When
from django.utils import timezone

from accounts.auth import KeyPrincipal, principal_for_key
from billing import recorder
from billing.ledger import attempts_so_far
from core.db import run_db_atomic
from core.errors import GatewayError, invalid_request
from gateway import dialects, files, flow, validation
from gateway.batch_shapes import EXPIRED_ERROR, batch_out, line_output
from gateway.batches import ACTIVE, ENDPOINTS, TERMINAL, enqueue_run
from gateway.call import Call
from gateway.models import Batch, BatchLine, BatchLineStatus, BatchStatus

logger = logging.getLogger(__name__)
T = TypeVar("T")

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
    # A native batch's lines are the provider's to run (gateway.native_batches).
    if batch is None or batch.native_state:
        return None
    return Job(batch.id, batch.public_id, batch.team_id, batch.key_id, batch.endpoint, batch.status)


def _claim(batch_id: int, token: str, want: int) -> list[Claimed]:
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.select_for_update().filter(id=batch_id).first()
        if (
            batch is None
            or batch.native_state
            or batch.status != BatchStatus.IN_PROGRESS
            or now >= batch.expires_at
        ):
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
            output.append(line_output(line))
        elif line.status in (BatchLineStatus.FAILED, BatchLineStatus.EXPIRED):
            errors.append(line_output(line))
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
    return dataclasses.replace(
        principal, markup_percent=recorder.batch_markup(principal.markup_percent)
    )


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
        last_attempt, answered = await run_db_atomic(attempts_so_far, request_id)
        if answered:
            # A rerun after a crash that lost an answer already billed: the provider
            # is paid again (the row keeps its list cost) but the line is charged once.
            principal = dataclasses.replace(principal, markup_percent=Decimal(-100))
        parsed = endpoint.validate(body)
        if parsed.stream:
            raise invalid_request("Streaming is not supported in a batch.", param="stream")
        call = Call(
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
        # Charged nothing when answered (above), so there is nothing to reserve or settle.
        result = await flow.run(call, parsed.fallbacks, reserve=not answered)
        assert result.data is not None  # batch lines never stream, cache or replay
        return Outcome(200, result.data)
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
            found = await run_db_atomic(principal_for_key, key_id)
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
                        enqueue_run(job.batch_id)
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
        Batch.objects.filter(status__in=ACTIVE, native_state="")
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
        enqueue_run(batch_id)
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
