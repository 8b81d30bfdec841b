"""The Batch API (OpenAI-compatible): creating, reading, listing and cancelling batches.

Creation validates the whole input file at once; any bad line fails the batch with
per-line errors in `errors.data` (as OpenAI does), otherwise one BatchLine row per
request is written and a worker task is queued. A batch whose lines all go to one
deployment whose provider has a batch API is sent to that API
(`gateway.native_batch_step`, whose body is gateway.native_batches) and billed at the
provider's batch prices; any other runs live, line by line (`gateway.batch_run`,
gateway.batch_runner). The OpenAI JSON shapes are in gateway.batch_shapes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.auth import KeyPrincipal
from core import tasks
from core.errors import GatewayError, invalid_request
from gateway import dialects, files, flow
from gateway.models import (
    Batch,
    BatchLine,
    BatchLineStatus,
    BatchStatus,
    FilePurpose,
    NativeState,
)
from gateway.routing import Deployment, RoutingTable

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
# The endpoints each provider's batch API takes. Anthropic's Message Batches take
# Messages requests: a chat line is translated into one.
NATIVE_ENDPOINTS: dict[str, frozenset[str]] = {
    "openai": frozenset(ENDPOINTS),
    "azure": frozenset(ENDPOINTS),
    "anthropic": frozenset({"/v1/chat/completions"}),
}
# Body parameters only our flow understands: a line with them must run live.
_GATEWAY_ONLY_PARAMS = ("fallbacks", "models")


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
            flow.plan(principal, table, model, None)
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


def native_deployment(
    lines: list[ParsedLine], *, endpoint: str, table: RoutingTable
) -> Deployment | None:
    """The deployment to send the whole batch to natively, or None to run it live.

    Native only when every line names the same model, that model is served by exactly
    one deployment and has no fallbacks (a provider batch cannot balance, fall back or
    retry elsewhere), and its provider has a batch API taking this endpoint.
    """
    if not settings.GATEWAY_NATIVE_BATCHES or not lines:
        return None
    models = {table.resolve(str(line.body["model"])) for line in lines}
    if len(models) != 1:
        return None
    model = models.pop()
    group = table.group(model)
    if len(group) != 1 or not group[0].native_batches:
        return None
    # Configured fallbacks would route a failed line elsewhere: only live lines can.
    if table.policy(model).fallbacks:
        return None
    deployment = group[0]
    if endpoint not in NATIVE_ENDPOINTS.get(deployment.provider, frozenset()):
        return None
    if any(param in line.body for line in lines for param in _GATEWAY_ONLY_PARAMS):
        return None
    return deployment


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
    native = None if errors else native_deployment(lines, endpoint=endpoint, table=table)
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
            # A native batch's first step claims it by a null (or stale) heartbeat.
            heartbeat_at=None if native else now,
            native_state=NativeState.UPLOADING if native else "",
            native_provider=native.provider if native else "",
            native_deployment_id=native.id if native else "",
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
            if native:
                transaction.on_commit(lambda: enqueue_native_step(batch_id))
            else:
                transaction.on_commit(lambda: enqueue_run(batch_id))
    return batch


def enqueue_run(batch_id: int, countdown: float | None = None) -> None:
    tasks.send("gateway.batch_run", batch_id, countdown=countdown)


def enqueue_native_step(batch_id: int, countdown: float | None = None) -> None:
    tasks.send("gateway.native_batch_step", batch_id, countdown=countdown)


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
            pk = batch.id
            if batch.native_state:
                # The provider's batch is cancelled by the next step; which lines it still
                # answered is for its results to say, so no line is touched here.
                transaction.on_commit(lambda: enqueue_native_step(pk))
            else:
                # Lines not started never will be; those running finish and are kept.
                BatchLine.objects.filter(batch=batch, status=BatchLineStatus.PENDING).update(
                    status=BatchLineStatus.CANCELLED, finished_at=now
                )
                transaction.on_commit(lambda: enqueue_run(pk))
        elif batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            raise GatewayError(
                f"Cannot cancel a batch with status '{batch.status}'.",
                409,
                "invalid_request_error",
                "batch_not_cancellable",
            )
    return batch_get(principal=principal, batch_id=batch_id)
