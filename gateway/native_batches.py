"""Native batches: a batch sent to its provider's own batch API, at its batch prices.

OpenAI and Azure OpenAI (`/v1/files` + `/v1/batches`) and Anthropic (Message Batches).
gateway.batches decides at creation (every line to one deployment with a batch API);
this module drives the batch through a forward-only state machine on the Batch row:

    uploading    reserve the batch's most against budgets, store the reservation;
                 upload the input (models rewritten to the provider's, custom_id kept),
                 store the provider file id; create the provider batch, store its id
    submitted    beat polls it (`gateway.native_batches_poll`); our cancel is sent on
    downloading  it ended: each result line is billed (one ledger row per line, request
                 id derived from batch + custom_id, at the batch prices) and stored on
                 its BatchLine by compare-and-set; the reservation is settled
    done         our output and error files are written (gateway.batch_runner._finalize)

Each step stores what it made before the next starts, and is claimed by
compare-and-set on the heartbeat for a lease, so a worker killed anywhere resumes
(the poll re-queues steps whose heartbeat went stale). Before creating a provider
batch the provider's list is searched for one carrying our batch id in its metadata
(OpenAI) or custom ids (Anthropic: ids are made from our batch id), so a kill between
"created" and "stored" never makes a second one. A re-billed line is dropped by the
ledger's unique (request_id, attempt).

Provider calls go over the gateway's pooled HTTP client without following redirects
(litellm's batch functions use the OpenAI SDK's client, which follows them, and in
this litellm version have no Anthropic create).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from accounts.auth import KeyPrincipal, principal_for_key
from billing import admission, recorder
from billing.ledger import AttemptRecord
from billing.models import LedgerEntry
from billing.pricing import Usage, max_cost_micro_usd
from core.db import run_db_atomic
from core.errors import GatewayError
from gateway import dialects, upstream, validation
from gateway.batch_runner import _finalize, run_async
from gateway.batch_shapes import EXPIRED_ERROR
from gateway.batches import ENDPOINTS, enqueue_native_step, enqueue_run
from gateway.models import Batch, BatchLine, BatchLineStatus, BatchStatus, NativeState
from gateway.routing import Deployment, routing_tables

logger = logging.getLogger(__name__)

OPENAI_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
ANTHROPIC_ENDED = "ended"
# Lines billed and stored per transaction while downloading.
CHUNK = 50
AZURE_API_VERSION = "2024-10-21"
ANTHROPIC_VERSION = "2023-06-01"


class ProviderError(Exception):
    """The provider refused or failed a batch call; the step is retried later."""


# --- the provider's HTTP API ---------------------------------------------------------------------


def _target(deployment: Deployment, path: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL, headers and query for a batch API `path` such as 'files' or 'messages/batches'."""
    if deployment.provider == "anthropic":
        base = (deployment.api_base or upstream.ANTHROPIC_DEFAULT_BASE).rstrip("/")
        root = base if base.endswith("/v1") else f"{base}/v1"
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if deployment.api_key:
            headers["x-api-key"] = deployment.api_key
        return f"{root}/{path}", headers, {}
    if deployment.provider == "azure":
        base = deployment.api_base.rstrip("/")
        base = base.removesuffix("/openai")
        headers = {"api-key": deployment.api_key} if deployment.api_key else {}
        query = {"api-version": deployment.api_version or AZURE_API_VERSION}
        return f"{base}/openai/{path}", headers, query
    base = (deployment.api_base or upstream.OPENAI_DEFAULT_BASE).rstrip("/")
    headers = {"authorization": f"Bearer {deployment.api_key}"} if deployment.api_key else {}
    return f"{base}/{path}", headers, {}


async def _call(
    deployment: Deployment,
    method: str,
    path: str,
    *,
    json: Any = None,
    form: aiohttp.FormData | None = None,
    params: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    url, headers, query = _target(deployment, path)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    try:
        async with upstream.session().request(
            method,
            url,
            headers=headers,
            params={**query, **(params or {})},
            data=form if form is not None else (orjson.dumps(json) if json is not None else None),
            allow_redirects=False,
            timeout=timeout,
        ) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ProviderError(f"{method} {path}: {type(exc).__name__}") from exc


async def _json(deployment: Deployment, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    status, body = await _call(deployment, method, path, **kwargs)
    if status >= 300:
        raise ProviderError(f"{method} {path}: {status} {upstream.sanitise(body[:300].decode())}")
    data = orjson.loads(body)
    if not isinstance(data, dict):
        raise ProviderError(f"{method} {path}: not a JSON object")
    return data


def _anthropic_custom_id(batch_public_id: str, custom_id: str) -> str:
    # Anthropic's custom_id allows [a-zA-Z0-9_-]{1,64}; ours may be any 512 characters.
    # Derived from our batch too, so another batch's results can never match a line.
    digest = hashlib.sha256(f"{batch_public_id}\x00{custom_id}".encode()).hexdigest()
    return "l" + digest[:40]


def _anthropic_params(deployment: Deployment, body: dict[str, Any]) -> dict[str, Any]:
    """A chat completions body as Anthropic Messages params, through litellm's translation."""
    import litellm

    config = litellm.AnthropicConfig()
    messages = body.get("messages") or []
    optional = {k: v for k, v in body.items() if k not in ("model", "messages", "metadata", "user")}
    mapped = config.map_openai_params(
        non_default_params=optional,
        optional_params={},
        model=deployment.upstream_model,
        drop_params=deployment.drop_unsupported_params,
    )
    params = config.transform_request(
        model=deployment.upstream_model,
        messages=messages,
        optional_params=mapped,
        litellm_params={},
        headers={},
    )
    params["model"] = deployment.upstream_model
    params.setdefault(
        "max_tokens", deployment.max_output_tokens or settings.GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS
    )
    params.pop("stream", None)
    return dict(params)


def _anthropic_to_chat(message: dict[str, Any], request_id: str) -> dict[str, Any]:
    """An Anthropic message as a chat completion (the shape our output file promises)."""
    text = "".join(
        part.get("text", "") for part in message.get("content") or [] if part.get("type") == "text"
    )
    usage = dialects.anthropic_usage(message.get("usage")) or Usage()
    finish = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(
        str(message.get("stop_reason")), "stop"
    )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(timezone.now().timestamp()),
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_read_tokens},
        },
    }


# --- database steps (sync, run through run_db_atomic) --------------------------------------------


@dataclass(frozen=True)
class NativeJob:
    id: int
    public_id: str
    team_id: int
    key_id: int
    endpoint: str
    status: str
    state: str
    deployment_id: str
    provider_file_id: str
    provider_batch_id: str
    reservation: dict[str, Any] | None
    expires_at: datetime
    created_at: datetime
    provider_status: str


def _load(batch_id: int) -> NativeJob | None:
    b = Batch.objects.filter(id=batch_id).first()
    if b is None or not b.native_state:
        return None
    return NativeJob(
        b.id,
        b.public_id,
        b.team_id,
        b.key_id,
        b.endpoint,
        b.status,
        b.native_state,
        b.native_deployment_id,
        b.provider_file_id,
        b.provider_batch_id,
        b.native_reservation,
        b.expires_at,
        b.created_at,
        b.provider_status,
    )


def _lease() -> timedelta:
    return timedelta(seconds=settings.GATEWAY_BATCH_LEASE_SECONDS)


def _claim(batch_id: int, state: str) -> bool:
    """Take the batch's current step for a lease; False if another worker holds it."""
    now = timezone.now()
    return bool(
        Batch.objects.filter(id=batch_id, native_state=state)
        .filter(Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=now - _lease()))
        .update(heartbeat_at=now)
    )


def _beat(batch_id: int) -> None:
    Batch.objects.filter(id=batch_id).update(heartbeat_at=timezone.now())


def _set(batch_id: int, only_if: dict[str, Any], **values: Any) -> bool:
    """Compare-and-set on the Batch row: write `values` only where `only_if` still holds."""
    return bool(Batch.objects.filter(id=batch_id, **only_if).update(**values))


def _lines(batch_id: int) -> list[tuple[int, str, dict[str, Any], str]]:
    return list(
        BatchLine.objects.filter(batch_id=batch_id)
        .order_by("line_no")
        .values_list("id", "custom_id", "body", "request_id")
    )


def _fail_before_submit(batch_id: int, error: GatewayError) -> None:
    """Refused before anything reached the provider (a budget): the batch fails whole."""
    now = timezone.now()
    with transaction.atomic():
        if Batch.objects.filter(id=batch_id, native_state=NativeState.UPLOADING).update(
            status=BatchStatus.FAILED,
            failed_at=now,
            native_state=NativeState.DONE,
            errors=[{"code": error.code, "message": error.message, "param": None, "line": None}],
        ):
            BatchLine.objects.filter(batch_id=batch_id, status=BatchLineStatus.PENDING).update(
                status=BatchLineStatus.FAILED,
                status_code=error.status,
                response_body=error.openai_body(),
                finished_at=now,
            )


def _to_live(batch_id: int) -> bool:
    """Nothing was submitted and the deployment is gone: run the lines live instead."""
    return _set(
        batch_id,
        {"native_state": NativeState.UPLOADING, "provider_batch_id": ""},
        native_state="",
        heartbeat_at=timezone.now(),
    )


@dataclass(frozen=True)
class LineResult:
    line_id: int
    status: str
    status_code: int | None
    body: dict[str, Any] | None
    error: dict[str, Any] | None


def _store(batch_id: int, results: list[LineResult]) -> None:
    """Each line's result, once: only a line still pending takes one (compare-and-set)."""
    now = timezone.now()
    completed = failed = 0
    with transaction.atomic():
        for r in results:
            stored = BatchLine.objects.filter(id=r.line_id, status=BatchLineStatus.PENDING).update(
                status=r.status,
                status_code=r.status_code,
                response_body=r.body,
                error=r.error,
                finished_at=now,
            )
            if stored and r.status == BatchLineStatus.SUCCEEDED:
                completed += 1
            elif stored and r.status == BatchLineStatus.FAILED:
                failed += 1
        Batch.objects.filter(id=batch_id).update(
            completed=F("completed") + completed, failed=F("failed") + failed, heartbeat_at=now
        )


def _charged_total(request_ids: list[str]) -> int:
    rows = LedgerEntry.objects.filter(request_id__in=request_ids)
    return sum(rows.values_list("charged_cost_micro_usd", flat=True))


# --- the steps ------------------------------------------------------------------------------------


def _max_cost(
    lines: list[tuple[int, str, dict[str, Any], str]],
    endpoint: dialects.Endpoint,
    deployment: Deployment,
    markup: Decimal,
) -> int:
    """The most every line together can be charged at the batch prices (flow's rules:
    every prompt byte a token, the capped or the model's maximum output per answer)."""
    prices = deployment.batch_prices
    assert prices is not None
    total = 0
    for _, _, body, _ in lines:
        prompt = dialects.text_bytes(body, endpoint.prompt_fields) + 32
        per_answer = endpoint.requested_output(body)
        if per_answer is None:
            per_answer = deployment.max_output_tokens or settings.GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS
        total += max_cost_micro_usd(
            prompt, int(per_answer) * endpoint.answers(body), prices, markup
        )
    return total


async def _reserve(job: NativeJob, principal: KeyPrincipal, deployment: Deployment) -> bool:
    """Admit the batch against budgets before anything is sent. False: refused (failed)."""
    if job.reservation is not None:
        return True
    lines = await run_db_atomic(_lines, job.id)
    amount = _max_cost(lines, ENDPOINTS[job.endpoint], deployment, principal.markup_percent)
    reservation_id = f"{job.public_id}:native"
    lease = (job.expires_at - timezone.now()).total_seconds() + 3600
    try:
        keys = await admission.admit_batch(
            principal=principal,
            reservation_id=reservation_id,
            amount=amount,
            lease_seconds=max(lease, 3600),
        )
    except GatewayError as exc:
        await run_db_atomic(_fail_before_submit, job.id, exc)
        return False
    stored = {"id": reservation_id, "amount": amount, "budget_keys": keys}
    await run_db_atomic(
        _set, job.id, {"native_reservation__isnull": True}, native_reservation=stored
    )
    return True


def _input_file(
    job: NativeJob, lines: list[tuple[int, str, dict[str, Any], str]], dep: Deployment
) -> bytes:
    out = []
    for _, custom_id, body, _ in lines:
        item = {
            "custom_id": custom_id,
            "method": "POST",
            "url": job.endpoint,
            "body": {**body, "model": dep.upstream_model},
        }
        out.append(orjson.dumps(item))
    return b"\n".join(out) + b"\n"


async def _submit_openai(job: NativeJob, deployment: Deployment) -> str:
    file_id = job.provider_file_id
    if not file_id:
        lines = await run_db_atomic(_lines, job.id)
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file",
            _input_file(job, lines, deployment),
            filename=f"{job.public_id}.jsonl",
            content_type="application/jsonl",
        )
        uploaded = await _json(deployment, "POST", "files", form=form)
        file_id = str(uploaded["id"])
        # A racing worker's upload may have won: use the stored one (ours is an orphan).
        if not await run_db_atomic(
            _set, job.id, {"provider_file_id": ""}, provider_file_id=file_id
        ):
            reloaded = await run_db_atomic(_load, job.id)
            assert reloaded is not None
            file_id = reloaded.provider_file_id
    # Created before but not stored (killed in between)? Find it by our id in metadata.
    listed = await _json(deployment, "GET", "batches", params={"limit": "100"})
    for item in listed.get("data") or []:
        if (item.get("metadata") or {}).get("gateway_batch_id") == job.public_id:
            return str(item["id"])
    created = await _json(
        deployment,
        "POST",
        "batches",
        json={
            "input_file_id": file_id,
            "endpoint": job.endpoint,
            "completion_window": "24h",
            "metadata": {"gateway_batch_id": job.public_id},
        },
    )
    return str(created["id"])


async def _submit_anthropic(job: NativeJob, deployment: Deployment, since: datetime) -> str:
    lines = await run_db_atomic(_lines, job.id)
    if job.provider_status == "creating":
        # Killed between creating and storing? Message Batches have no metadata: the
        # batch created since our attempt started with exactly our number of requests
        # is ours (its custom ids, derived from our batch id, are checked on download).
        listed = await _json(deployment, "GET", "messages/batches", params={"limit": "100"})
        for item in listed.get("data") or []:
            counts = item.get("request_counts") or {}
            created = datetime.fromisoformat(str(item.get("created_at")).replace("Z", "+00:00"))
            if created >= since and sum(int(v or 0) for v in counts.values()) == len(lines):
                return str(item["id"])
    await run_db_atomic(_set, job.id, {}, provider_status="creating")
    requests = [
        {
            "custom_id": _anthropic_custom_id(job.public_id, custom_id),
            "params": _anthropic_params(deployment, body),
        }
        for _, custom_id, body, _ in lines
    ]
    answer = await _json(deployment, "POST", "messages/batches", json={"requests": requests})
    return str(answer["id"])


async def _upload_and_create(job: NativeJob, principal: KeyPrincipal, dep: Deployment) -> bool:
    if not await _reserve(job, principal, dep):
        return False
    reloaded: NativeJob | None = await run_db_atomic(_load, job.id)
    job = reloaded or job
    if job.provider_batch_id:
        provider_batch_id = job.provider_batch_id
    elif dep.provider == "anthropic":
        provider_batch_id = await _submit_anthropic(job, dep, job.created_at)
    else:
        provider_batch_id = await _submit_openai(job, dep)
    return await run_db_atomic(
        _set,
        job.id,
        {"native_state": NativeState.UPLOADING},
        provider_batch_id=provider_batch_id,
        native_state=NativeState.SUBMITTED,
    )


async def _poll(job: NativeJob, dep: Deployment) -> bool:
    """Ask the provider how the batch is doing (cancelling it if ours is); True if ended."""
    anthropic = dep.provider == "anthropic"
    path = ("messages/batches/" if anthropic else "batches/") + job.provider_batch_id
    if job.status == BatchStatus.CANCELLING:
        status, _ = await _call(dep, "POST", f"{path}/cancel")
        # 409 / 400: it ended or is cancelling already; the poll below says which.
        if status >= 500:
            raise ProviderError(f"cancel: {status}")
    data = await _json(dep, "GET", path)
    state = str(data.get("processing_status" if anthropic else "status") or "")
    await run_db_atomic(_set, job.id, {}, provider_status=state[:32])
    return state == ANTHROPIC_ENDED if anthropic else state in OPENAI_TERMINAL


def _principal_markup(principal: KeyPrincipal | None) -> Decimal:
    # A key revoked or deleted since: the provider billed the lines all the same, so
    # they are charged, at the team's markup as of submission (the reservation's basis).
    return principal.markup_percent if principal is not None else Decimal(0)


async def _results(job: NativeJob, dep: Deployment) -> dict[str, dict[str, Any]]:
    """custom_id → {"status_code", "body"} or {"error"}, in OpenAI's shape."""
    out: dict[str, dict[str, Any]] = {}
    if dep.provider == "anthropic":
        path = f"messages/batches/{job.provider_batch_id}/results"
        status, raw = await _call(dep, "GET", path)
        if status >= 300:
            raise ProviderError(f"results: {status}")
        for line in raw.splitlines():
            if line.strip():
                item = orjson.loads(line)
                out[str(item.get("custom_id"))] = item.get("result") or {}
        return out
    data = await _json(dep, "GET", f"batches/{job.provider_batch_id}")
    for key in ("output_file_id", "error_file_id"):
        file_id = data.get(key)
        if not file_id:
            continue
        status, raw = await _call(dep, "GET", f"files/{file_id}/content")
        if status >= 300:
            raise ProviderError(f"file content: {status}")
        for line in raw.splitlines():
            if line.strip():
                item = orjson.loads(line)
                out[str(item.get("custom_id"))] = item
    return out


def _classify(
    dep: Deployment, request_id: str, found: dict[str, Any] | None
) -> tuple[str, int | None, dict[str, Any] | None, dict[str, Any] | None, Usage | None]:
    """(line status, status code, response body, error, usage to bill) for one result."""
    if found is None:
        missing = {
            "code": "batch_failed",
            "message": "The provider returned no result for this request.",
        }
        return BatchLineStatus.FAILED, None, None, missing, None
    if dep.provider == "anthropic":
        kind = found.get("type")
        if kind == "succeeded":
            message = found.get("message") or {}
            body = _anthropic_to_chat(message, request_id)
            return (
                BatchLineStatus.SUCCEEDED,
                200,
                body,
                None,
                dialects.anthropic_usage(message.get("usage")),
            )
        if kind == "canceled":
            return BatchLineStatus.CANCELLED, None, None, None, None
        if kind == "expired":
            return BatchLineStatus.EXPIRED, None, None, dict(EXPIRED_ERROR), None
        err = (found.get("error") or {}).get("error") or found.get("error") or {}
        failure: dict[str, Any] = {
            "error": {
                "message": upstream.sanitise(str(err.get("message") or "")),
                "type": str(err.get("type") or "api_error"),
                "param": None,
                "code": None,
            }
        }
        return BatchLineStatus.FAILED, 400, failure, None, None
    response = found.get("response")
    error: dict[str, Any] | None = found.get("error")
    if response is None:
        code = (error or {}).get("code")
        if code == "batch_cancelled":
            return BatchLineStatus.CANCELLED, None, None, None, None
        if code == "batch_expired":
            return BatchLineStatus.EXPIRED, None, None, error, None
        return (
            BatchLineStatus.FAILED,
            None,
            None,
            error or {"code": "batch_failed", "message": "failed"},
            None,
        )
    status_code = int(response.get("status_code") or 0)
    body = response.get("body")
    if status_code == 200 and isinstance(body, dict):
        body = {**body, "id": body.get("id")}
        return (
            BatchLineStatus.SUCCEEDED,
            200,
            body,
            None,
            dialects.openai_usage(body.get("usage")) or Usage(),
        )
    # Errored lines are not billed: the provider bills none.
    return (
        BatchLineStatus.FAILED,
        status_code or 500,
        body if isinstance(body, dict) else None,
        None,
        None,
    )


async def _download(job: NativeJob, principal: KeyPrincipal | None, dep: Deployment) -> None:
    """Bill and store every result line, then settle the reservation. Resumable: a line
    billed before a kill is dropped by the ledger's unique key, a stored one by its CAS."""
    results = await _results(job, dep)
    lines = await run_db_atomic(_lines, job.id)
    endpoint = ENDPOINTS[job.endpoint]
    markup = _principal_markup(principal)
    prices = dep.batch_prices
    now = timezone.now()
    for start in range(0, len(lines), CHUNK):
        chunk = lines[start : start + CHUNK]
        stored: list[LineResult] = []
        bills = []
        for line_id, custom_id, body, request_id in chunk:
            key = (
                _anthropic_custom_id(job.public_id, custom_id)
                if dep.provider == "anthropic"
                else custom_id
            )
            status, code, response, error, usage = _classify(dep, request_id, results.get(key))
            stored.append(LineResult(line_id, status, code, response, error))
            if usage is None:
                continue
            attempt = AttemptRecord(
                request_id=request_id,
                attempt=1,
                team_id=job.team_id,
                key_id=job.key_id,
                endpoint=endpoint.name,
                model=str(body.get("model") or ""),
                status="success",
                started_at=now,
                ended_at=now,
                usage=usage,
                deployment_id=dep.id,
                provider=dep.provider,
                provider_model=dep.provider_model,
                http_status=200,
                is_batch=True,
                end_user=str(body.get("user") or ""),
                tags=validation.tags_from(None, body.get("metadata")),
            )
            bills.append(recorder.record(attempt, prices=prices, markup_percent=markup))
        # Billed first, then stored: a kill in between re-bills (dropped as a repeat)
        # and stores; never a stored line without its row.
        await asyncio.gather(*bills)
        await run_db_atomic(_store, job.id, stored)
    reservation = job.reservation or {}
    if reservation.get("budget_keys"):
        total = await run_db_atomic(_charged_total, [line[3] for line in lines])
        await admission.settle_batch(
            reservation_id=str(reservation["id"]),
            budget_keys=list(reservation["budget_keys"]),
            actual=total,
        )


async def _step(batch_id: int) -> str:
    job = await run_db_atomic(_load, batch_id)
    if job is None or job.state == NativeState.DONE:
        return "done"
    table = await routing_tables.get()
    dep = table.deployments.get(job.deployment_id)
    if dep is None:
        if job.state == NativeState.UPLOADING and await run_db_atomic(_to_live, batch_id):
            enqueue_run(batch_id)
            return "live"
        logger.error("native batch %s: deployment %s is gone", job.public_id, job.deployment_id)
        return "no-deployment"
    principal = await run_db_atomic(principal_for_key, job.key_id)
    if job.state == NativeState.UPLOADING:
        if job.status == BatchStatus.CANCELLING and not job.provider_batch_id:
            # Cancelled before anything ran: nothing was sent, nothing to bill.
            await run_db_atomic(_cancel_unsubmitted, batch_id)
            await run_db_atomic(_finalize, batch_id)
            return "cancelled"
        if not await run_db_atomic(_claim, batch_id, NativeState.UPLOADING):
            return "elsewhere"
        if principal is None:
            await run_db_atomic(
                _fail_before_submit,
                batch_id,
                GatewayError(
                    "The API key that created this batch is gone.", 401, code="invalid_api_key"
                ),
            )
            await run_db_atomic(_finalize, batch_id)
            return "failed"
        if not await _upload_and_create(job, principal, dep):
            await run_db_atomic(_finalize, batch_id)
            return "failed"
        job = await run_db_atomic(_load, batch_id)
        assert job is not None
    if job.state == NativeState.SUBMITTED:
        if not await _poll(job, dep):
            return "waiting"
        if not await run_db_atomic(
            _set,
            batch_id,
            {"native_state": NativeState.SUBMITTED},
            native_state=NativeState.DOWNLOADING,
            heartbeat_at=timezone.now(),
        ):
            return "elsewhere"
    elif job.state == NativeState.DOWNLOADING and not await run_db_atomic(
        _claim, batch_id, NativeState.DOWNLOADING
    ):
        return "elsewhere"
    job = await run_db_atomic(_load, batch_id)
    assert job is not None
    await _download(job, principal, dep)
    await run_db_atomic(
        _set, batch_id, {"native_state": NativeState.DOWNLOADING}, native_state=NativeState.DONE
    )
    await run_db_atomic(_finalize, batch_id)
    return "done"


def _cancel_unsubmitted(batch_id: int) -> None:
    now = timezone.now()
    with transaction.atomic():
        if _set(
            batch_id,
            {"native_state": NativeState.UPLOADING, "provider_batch_id": ""},
            native_state=NativeState.DONE,
        ):
            BatchLine.objects.filter(batch_id=batch_id, status=BatchLineStatus.PENDING).update(
                status=BatchLineStatus.CANCELLED, finished_at=now
            )


def native_step(*, batch_id: int) -> str:
    """Move a native batch as far as it goes now (the worker task's body). Safe to run
    anywhere, any number of times, concurrently."""
    try:
        return run_async(_step(batch_id))
    except ProviderError as exc:
        # Retried by the next poll; nothing was stored that a retry would repeat.
        logger.warning("native batch %s: %s", batch_id, exc)
        return "retry"


def native_batches_poll(*, now: datetime | None = None) -> list[int]:
    """Queue a step for every native batch in flight (beat): the submitted ones to poll,
    the others when their worker stopped (a stale heartbeat)."""
    now = now or timezone.now()
    stale = now - _lease()
    ids = list(
        Batch.objects.filter(
            Q(native_state=NativeState.SUBMITTED)
            | Q(
                native_state__in=(NativeState.UPLOADING, NativeState.DOWNLOADING),
                heartbeat_at__isnull=True,
            )
            | Q(
                native_state__in=(NativeState.UPLOADING, NativeState.DOWNLOADING),
                heartbeat_at__lt=stale,
            )
        ).values_list("id", flat=True)
    )
    for batch_id in ids:
        enqueue_native_step(batch_id)
    return ids
