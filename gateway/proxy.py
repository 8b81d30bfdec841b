"""The data-plane request flow, shared by every endpoint and both dialects.

    authenticate → parse and validate → resolve the model and its fallback chain
      → admit (reserve budget, count rate limits) → attempts: pick a deployment,
        call the provider, one ledger row per attempt, retry or fall back on
        retryable errors → settle the reservation → respond

A ledger row is written before the response is complete: for JSON before the
response is returned, for a stream before its end marker (`data: [DONE]`,
`message_stop`, `response.completed`) is sent. So a response a client has fully
received always has its row, even if the process is killed right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone

from accounts.auth import KeyPrincipal, authenticate
from billing import admission, spool
from billing.ledger import AttemptRecord
from billing.models import LedgerStatus
from billing.pricing import (
    FREE,
    Usage,
    charged_cost_micro_usd,
    list_cost_micro_usd,
    micro_usd_to_str,
)
from billing.writer import ledger_writer
from core import errors
from core.db import run_db
from core.errors import GatewayError
from gateway import breaker, idempotency, response_cache, response_ids, upstream, validation
from gateway.dialects import Endpoint, Tracker, count_text, stream_text, text_bytes
from gateway.routing import Deployment, RoutingTable, routing_tables

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Streams whose client left keep being read for this long, so that what the
# provider generated (and will bill us for) is known and billed.
STREAM_DRAIN_SECONDS = 60.0
# Per-stream memory: at most this many events wait for a slow client; past that the
# pump waits too, which slows the provider down (TCP backpressure) instead of
# buffering the whole stream here.
STREAM_QUEUE_EVENTS = 64
# A client that takes nothing for this long (or whose response never started) is
# treated as gone: the pump stops waiting for it and drains and bills the stream.
STREAM_CLIENT_STALL_SECONDS = 60.0
# Raw events are kept only to count the generated text if the provider never reports
# usage; past this many bytes they are folded into a running token count.
STREAM_FOLD_BYTES = 256 * 1024
MAX_BACKOFF_SECONDS = 8.0

# Tasks that outlive their request (stream pumps); kept so they are not collected.
_background: set[asyncio.Task[Any]] = set()


@dataclass
class Call:
    """One client request on its way through the gateway."""

    request_id: str
    endpoint: Endpoint
    principal: KeyPrincipal
    model: str
    body: dict[str, Any]
    stream: bool
    started_at: datetime
    started_mono: float
    headers: dict[str, str]
    end_user: str = ""
    tags: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    # Of prompt_tokens: the context a `previous_response_id` carries in.
    carried_tokens: int = 0
    attempts: int = 0
    charged_micro_usd: int = 0
    claim: idempotency.Claim | None = None
    cache_key: response_cache.CacheKey | None = None
    # A line of a Batch API job (billed at the batch discount by its caller).
    is_batch: bool = False


def parse_json_body(request: HttpRequest) -> dict[str, Any]:
    limit = settings.GATEWAY_MAX_BODY_BYTES
    raw = request.body
    if len(raw) > limit:
        raise errors.body_too_large(limit)
    if not raw:
        raise GatewayError(
            "The request body is empty; send a JSON object.", 400, code="invalid_json"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(
            f"The request body is not valid JSON ({exc.msg} at position {exc.pos}).",
            400,
            code="invalid_json",
        ) from None
    return validation.require_object(body)


# --- the model and its fallback chain --------------------------------------------------------


def unknown_model(model: str) -> GatewayError:
    return GatewayError(
        f"The model '{model}' does not exist. GET /v1/models lists the models your key can use.",
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def model_not_allowed(model: str) -> GatewayError:
    return GatewayError(
        f"This key may not use the model '{model}'. GET /v1/models lists the models it can use.",
        403,
        "permission_error",
        "model_not_allowed",
        "model",
    )


def plan(
    principal: KeyPrincipal, table: RoutingTable, model: str, requested: tuple[str, ...] | None
) -> list[str]:
    """The models to try, in order: the requested one, then its fallbacks."""
    if not table.group(model):
        raise unknown_model(model)
    if not table.may_use(principal, model):
        raise model_not_allowed(model)
    if requested is not None:
        for name in requested:
            if not table.group(name):
                raise unknown_model(name)
            if not table.may_use(principal, name):
                raise model_not_allowed(name)
        fallbacks = list(requested)
    else:
        # Configured fallbacks the key may not use are skipped, not an error.
        fallbacks = [
            name
            for name in table.policy(model).fallbacks
            if table.group(name) and table.may_use(principal, name)
        ]
    return list(dict.fromkeys([model, *fallbacks]))


def reachable(principal: KeyPrincipal, table: RoutingTable, chain: list[str]) -> list[str]:
    """Every model the attempts loop may call for this chain, in order.

    `_attempts` leaves the chain on a context-window or content-policy failure for
    that model's configured fallbacks, whose own such fallbacks may follow: the
    transitive closure is what a reservation must price, or a budget sized for the
    cheap model pays for the expensive one.
    """
    seen = list(chain)
    for name in seen:  # grows while iterating: a breadth-first walk
        policy = table.policy(name)
        for fallback in (*policy.context_window_fallbacks, *policy.content_policy_fallbacks):
            if (
                fallback not in seen
                and table.group(fallback)
                and table.may_use(principal, fallback)
            ):
                seen.append(fallback)
    return seen


def refuse_media_downloads(
    principal: KeyPrincipal,
    endpoint: Endpoint,
    body: dict[str, Any],
    table: RoutingTable,
    chain: list[str],
) -> None:
    """Refuse, before anything is reserved or called, a media URL that some deployment
    the request may reach would make the gateway download (a client must not get the
    gateway to fetch from inside its network). Checked for every model the request may
    fall back to, context-window and content-policy fallbacks included: the promise
    holds on every attempt. The body is walked only when needed."""
    if not endpoint.media_fields:
        return
    fetcher = next(
        (
            name
            for name in reachable(principal, table, chain)
            for d in table.group(name)
            if endpoint.downloads_media_urls(d)
        ),
        None,
    )
    if fetcher is None:
        return
    for name in endpoint.media_fields:
        found = validation.find_remote_media(body.get(name), (name,))
        if found:
            raise errors.invalid_request(
                f"'{found}' is a URL, and model '{fetcher}' cannot take media by URL: the "
                "gateway would have to download it, and it never fetches a URL a request "
                "names. Send the content inline instead (a base64 data: URL).",
                param=found,
                code="remote_media_url",
            )


def _max_output(call: Call, table: RoutingTable, chain: list[str]) -> int:
    """Output tokens the request may make on any model of `chain`: the one rule for the
    budget reservation, the key's tokens-per-minute and a deployment's tpm.

    Every generated answer counts (`n`, `best_of`, each prompt of a list), whether the
    client capped them with max_tokens or the model's maximum output applies.
    """
    per_answer = call.endpoint.requested_output(call.body)
    if per_answer is None:
        per_answer = table.max_output_tokens(*chain) or settings.GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS
    return int(per_answer) * call.endpoint.answers(call.body)


def _reserved_prompt(call: Call) -> int:
    """Prompt tokens to reserve: an upper bound whatever tokenizer the provider uses.

    Our count (litellm's tokenizer) can be well below a provider's; no tokenizer
    makes more tokens than the text has bytes, so the bytes bound the count. A
    previous response's context is the provider's own count: exact already.
    """
    counted = call.prompt_tokens * 5 // 4
    text = text_bytes(call.body, call.endpoint.prompt_fields) + call.carried_tokens
    return max(counted, text) + 32


async def admit_call(call: Call, table: RoutingTable, chain: list[str]) -> admission.Ticket:
    """Reserve the most the request may cost on any model it may reach, and count it
    against the key's and team's rate limits (429 when it does not fit)."""
    carried = await response_ids.context_tokens(call.endpoint.name, call.principal, call.body)
    call.carried_tokens = carried
    call.prompt_tokens += carried
    priced = reachable(call.principal, table, chain)
    return await admission.admit(
        principal=call.principal,
        request_id=call.request_id,
        prompt_tokens=call.prompt_tokens,
        prompt_tokens_bound=_reserved_prompt(call),
        max_output_tokens=_max_output(call, table, priced),
        prices=table.max_prices(*priced),
    )


# --- ledger rows -----------------------------------------------------------------------------


def _record(
    call: Call,
    deployment: Deployment | None,
    *,
    status: str,
    usage: Usage | None,
    estimated: bool = False,
    http_status: int | None = None,
    error_type: str = "",
    ttft_ms: int | None = None,
    cache_hit: bool = False,
) -> AttemptRecord:
    usage = usage or Usage()
    prices = deployment.prices if deployment else None
    billable = prices is not None and not (cache_hit and not settings.GATEWAY_CACHE_BILL_HITS)
    list_cost = list_cost_micro_usd(usage, prices) if billable and prices else 0
    charged = (
        charged_cost_micro_usd(usage, prices, call.principal.markup_percent)
        if billable and prices
        else 0
    )
    return AttemptRecord(
        request_id=call.request_id,
        attempt=call.attempts,
        team_id=call.principal.team_id,
        key_id=call.principal.key_id,
        endpoint=call.endpoint.name,
        model=call.model,
        status=status,
        started_at=call.started_at,
        ended_at=timezone.now(),
        usage=usage,
        usage_estimated=estimated,
        list_cost_micro_usd=list_cost,
        charged_cost_micro_usd=charged,
        deployment_id=deployment.id if deployment else "",
        provider=deployment.provider if deployment else "",
        provider_model=deployment.provider_model if deployment else "",
        http_status=http_status,
        error_type=error_type,
        cache_hit=cache_hit,
        is_batch=call.is_batch,
        stream=call.stream,
        latency_ms=int((time.monotonic() - call.started_mono) * 1000),
        ttft_ms=ttft_ms,
        end_user=call.end_user,
        tags=call.tags,
    )


REPLAY_INTERVAL_SECONDS = 5.0
_replayer: asyncio.Task[None] | None = None
# Rows spooled by a process that died before replaying them are picked up by the
# next process, on its first ledger write.
_spool_checked_at_start = False


async def _write(call: Call, record: AttemptRecord) -> None:
    """The attempt's ledger row, in Postgres or, while it is down, in the durable spool."""
    global _spool_checked_at_start
    inserted = await ledger_writer.write(record)
    call.charged_micro_usd += record.charged_cost_micro_usd
    if not inserted:
        _start_replayer()
    elif not _spool_checked_at_start:
        _spool_checked_at_start = True
        if await run_db(spool.pending):
            _start_replayer()


def _start_replayer() -> None:
    """One background loop per process moves spooled rows into Postgres once it is back."""
    global _replayer
    if _replayer is None or _replayer.done():
        _replayer = asyncio.get_running_loop().create_task(
            _replay_until_empty(), context=contextvars.Context()
        )


async def _replay_until_empty() -> None:
    while True:
        await asyncio.sleep(REPLAY_INTERVAL_SECONDS)
        try:
            await run_db(spool.replay)
        except Exception as exc:  # still down: try again next interval
            logger.info("ledger spool replay deferred: %s", type(exc).__name__)
            continue
        if not await run_db(spool.pending):
            return


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
    _background.add(task)
    task.add_done_callback(_background.discard)


# --- error mapping ---------------------------------------------------------------------------


def client_error(exc: upstream.UpstreamError) -> GatewayError:
    """What the client sees for a provider failure: the right status, no provider internals."""
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    if exc.kind == "timeout" or exc.status in (408, 504):
        return GatewayError(
            "The provider did not answer in time; retry, or use a smaller request.",
            504,
            "server_error",
            "upstream_timeout",
        )
    if exc.kind == "connection":
        return GatewayError(
            "Could not reach the provider; retry shortly.",
            502,
            "server_error",
            "upstream_connection_error",
        )
    if exc.status == 429:
        return GatewayError(
            f"The provider is rate-limiting this model: {exc.message}",
            503,
            "server_error",
            "upstream_rate_limited",
            headers=headers,
        )
    if exc.status in (400, 413, 422):
        return GatewayError(
            exc.message,
            400,
            "invalid_request_error",
            exc.provider_code or "upstream_rejected",
            exc.param,
        )
    if exc.status in (401, 403):
        return GatewayError(
            "The provider refused the gateway's credentials for this model; "
            "an admin needs to check the deployment's api_key.",
            502,
            "server_error",
            "upstream_auth_error",
        )
    if exc.status == 404:
        return GatewayError(
            "The provider does not know this deployment's model; an admin needs to check it.",
            502,
            "server_error",
            "upstream_model_not_found",
        )
    if exc.status in (503, 529):
        return GatewayError(
            f"The provider is overloaded or unavailable: {exc.message}",
            503,
            "server_error",
            "upstream_unavailable",
            headers=headers,
        )
    return GatewayError(
        f"The provider failed: {exc.message}",
        502,
        "server_error",
        "upstream_error",
        headers=headers,
    )


def no_deployment(model: str) -> GatewayError:
    return GatewayError(
        f"Every deployment of '{model}' is cooling down after failures or at its rate limit; "
        "retry shortly.",
        503,
        "server_error",
        "no_deployment_available",
        headers={"retry-after": "1"},
    )


_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "maximum context",
    "too many tokens",
    "prompt is too long",
)
_POLICY_HINTS = ("content_policy", "content policy", "content_filter", "safety system")


def _kind(exc: upstream.UpstreamError) -> str:
    """retry | context | content_policy | deployment | client."""
    if exc.kind in ("timeout", "connection") or exc.status in (408, 429, 500, 502, 503, 504, 529):
        return "retry"
    text = f"{exc.provider_code or ''} {exc.message}".lower()
    if exc.status == 400 and any(hint in text for hint in _CONTEXT_HINTS):
        return "context"
    if exc.status == 400 and any(hint in text for hint in _POLICY_HINTS):
        return "content_policy"
    if exc.status in (401, 403, 404):
        return "deployment"  # our configuration's problem: try the next model, not this one again
    return "client"


def _backoff(retry: int, exc: upstream.UpstreamError, base: float, cap: float) -> float | None:
    """Seconds to wait before retry number `retry` (0-based); None: don't wait, fall back."""
    if exc.retry_after is not None:
        # A hair past the provider's time: the deployment's cooldown (opened for
        # exactly Retry-After) must have ended when the retry picks again.
        return exc.retry_after + 0.05 if exc.retry_after <= cap else None
    # Exponential with full jitter around the nominal delay.
    return min(MAX_BACKOFF_SECONDS, base * (2**retry)) * random.uniform(0.5, 1.5)  # noqa: S311


# --- the flow ------------------------------------------------------------------------------------

# Walking and counting a prompt costs CPU in proportion to its size: an 8 MB prompt's
# token count holds the event loop for about a second, and validating 100k tiny
# messages for over a second more, stalling every other request of the worker.
# Above this size that work runs in a thread (tiktoken releases the GIL while it
# encodes); below it, inline, since a thread hop would cost more than the work.
INLINE_COUNT_MAX_BYTES = 64 * 1024


async def _by_size(size: int, work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)`, in a thread when the body is large enough to stall the loop."""
    if size <= INLINE_COUNT_MAX_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


async def count_prompt(endpoint: Endpoint, model: str, body: dict[str, Any], size: int) -> int:
    return await _by_size(size, endpoint.count_prompt, model, body)


async def handle(request: HttpRequest, endpoint: Endpoint) -> HttpResponseBase:
    started_mono = time.monotonic()
    principal = await authenticate(request)
    body = parse_json_body(request)
    idempotency_key = idempotency.header_value(request.headers.get("idempotency-key"))
    parsed = await _by_size(len(request.body), endpoint.validate, body)
    call = Call(
        request_id=request.request_id,  # type: ignore[attr-defined]
        endpoint=endpoint,
        principal=principal,
        model=parsed.model,
        body=body,
        stream=parsed.stream,
        started_at=timezone.now(),
        started_mono=started_mono,
        headers={k.lower(): v for k, v in request.headers.items()},
        end_user=parsed.end_user,
        tags=validation.tags_from(request.headers.get("x-gateway-tags"), body.get("metadata")),
    )
    table = await routing_tables.get()
    chain = plan(principal, table, call.model, parsed.fallbacks)
    refuse_media_downloads(principal, endpoint, body, table, chain)
    if idempotency_key:
        call.claim = await idempotency.claim(
            principal.team_id,
            principal.key_id,
            idempotency_key,
            idempotency.fingerprint({"endpoint": endpoint.name, "body": body}),
            wait_seconds=settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS,
        )
        if call.claim.replay is not None:
            return _replay(call.claim.replay)
    try:
        call.cache_key = response_cache.key_for(principal, request, endpoint.name, call.model, body)
        if call.cache_key is not None:
            hit = await response_cache.lookup(call.cache_key)
            if hit is not None:
                return await _serve_hit(call, table, hit)
        call.prompt_tokens = await count_prompt(
            endpoint, table.group(call.model)[0].provider_model, body, len(request.body)
        )
        ticket = await admit_call(call, table, chain)
    except BaseException:
        if call.claim is not None:
            await idempotency.release(call.claim)
        raise
    # From here a provider may be called, so the work runs in its own task: a client
    # that hangs up cancels only its wait, never the call and its ledger row.
    work = asyncio.get_running_loop().create_task(
        _settled_attempts(call, table, chain, ticket), context=contextvars.Context()
    )
    _background.add(work)
    work.add_done_callback(_forget)
    return await asyncio.shield(work)


def _forget(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    # The client may have left: nobody else will look at the outcome.
    if not task.cancelled() and task.exception() is not None:
        logger.debug("request finished after its client left: %s", task.exception())


async def _settled_attempts(
    call: Call, table: RoutingTable, chain: list[str], ticket: admission.Ticket
) -> HttpResponseBase:
    try:
        return await _attempts(call, table, chain, ticket)
    except BaseException:
        if not ticket.settled:
            await admission.settle(ticket, call.charged_micro_usd)
        if call.claim is not None:
            await idempotency.release(call.claim)
        raise


def _replay(stored: idempotency.Stored) -> HttpResponseBase:
    response: HttpResponseBase
    if stored.stream:
        events = list(stored.events)

        async def again() -> AsyncIterator[bytes]:
            for event in events:
                yield event

        response = StreamingHttpResponse(again(), status=stored.status)
    else:
        response = HttpResponse(stored.body, status=stored.status)
    for name, value in stored.headers.items():
        response[name] = value
    response["idempotent-replayed"] = "true"
    return response


async def _attempts(
    call: Call, table: RoutingTable, chain: list[str], ticket: admission.Ticket
) -> HttpResponseBase:
    last: upstream.UpstreamError | None = None
    tried_any = False
    queue = list(chain)
    while queue:
        group = queue.pop(0)
        policy = table.policy(group)
        if _too_long(call, table, group):
            if policy.context_window_fallbacks:
                queue = _fallback_queue(call, table, policy.context_window_fallbacks)
            continue
        for retry in range(policy.num_retries + 1):
            try:
                deployment = await breaker.pick(
                    table, group, call.body, call.prompt_tokens + _max_output(call, table, [group])
                )
            except breaker.NoDeployment:
                break
            tried_any = True
            call.attempts += 1
            began = datetime.now()
            breaker.started(table, group, deployment, call.stream)
            try:
                if call.stream:
                    return await _stream(call, table, group, deployment, ticket, began)
                return await _json(call, table, group, deployment, ticket, began)
            except upstream.UpstreamError as exc:
                last = exc
                kind = _kind(exc)
                await _write(
                    call,
                    _record(
                        call,
                        deployment,
                        status=LedgerStatus.ERROR,
                        usage=None,
                        http_status=exc.status,
                        error_type=exc.kind,
                    ),
                )
                await breaker.failed(
                    table,
                    group,
                    deployment,
                    policy,
                    status=exc.status,
                    retry_after=exc.retry_after,
                    counts=kind != "client",
                    stream=call.stream,
                    began=began,
                )
                if kind == "client":
                    raise client_error(exc) from exc
                if kind == "context":
                    queue = _fallback_queue(call, table, policy.context_window_fallbacks)
                    break
                if kind == "content_policy":
                    if not policy.content_policy_fallbacks:
                        raise client_error(exc) from exc
                    queue = _fallback_queue(call, table, policy.content_policy_fallbacks)
                    break
                if kind == "deployment" or retry == policy.num_retries:
                    break
                wait = _backoff(
                    retry, exc, policy.retry_backoff_seconds, policy.max_retry_after_seconds
                )
                if wait is None:
                    break
                await asyncio.sleep(wait)
    if last is not None:
        raise client_error(last)
    if not tried_any and _too_long(call, table, call.model):
        raise GatewayError(
            f"The prompt ({call.prompt_tokens} tokens) is longer than '{call.model}' accepts, "
            "and no model with a larger context is configured as its fallback.",
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        )
    raise no_deployment(call.model)


def _fallback_queue(call: Call, table: RoutingTable, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if table.group(n) and table.may_use(call.principal, n)]


def _too_long(call: Call, table: RoutingTable, group: str) -> bool:
    limits = [d.context_length for d in table.group(group) if d.context_length]
    return bool(limits) and call.prompt_tokens > max(limits)


def _gateway_headers(response: HttpResponseBase, call: Call, deployment: Deployment | None) -> None:
    response["x-gateway-request-id"] = call.request_id
    response["x-gateway-attempts"] = str(call.attempts)
    if deployment is not None:
        response["x-gateway-model"] = deployment.provider_model


def _upstream_body(call: Call) -> dict[str, Any]:
    body = {k: v for k, v in call.body.items() if k not in validation.GATEWAY_PARAMS}
    metadata = call.body.get("metadata")
    if isinstance(metadata, dict):
        rest = {k: v for k, v in metadata.items() if k != "tags"}
        # `metadata` is the gateway's (tags) on chat; a provider sees the rest only
        # where its API defines it: stored chat completions, Responses, Messages.
        if rest and (call.endpoint.name != "chat.completions" or call.body.get("store")):
            body["metadata"] = rest
    return body


def _replayable_headers(response: HttpResponseBase) -> dict[str, str]:
    return {
        name: response[name] for name in idempotency.REPLAYED_HEADERS if response.has_header(name)
    }


async def _json(
    call: Call,
    table: RoutingTable,
    group: str,
    deployment: Deployment,
    ticket: admission.Ticket,
    began: datetime,
) -> HttpResponseBase:
    answer = await call.endpoint.call_json(deployment, _upstream_body(call), call.headers)
    usage = call.endpoint.usage_from_json(answer.data)
    estimated = usage is None
    if usage is None:
        usage = Usage(prompt_tokens=call.prompt_tokens)
    record = _record(
        call,
        deployment,
        status=LedgerStatus.SUCCESS,
        usage=usage,
        estimated=estimated,
        http_status=200,
    )
    await _write(call, record)
    await admission.settle(ticket, call.charged_micro_usd)
    await response_ids.remember(call.endpoint.name, call.principal, call.body, answer.data, usage)
    await breaker.succeeded(table, group, deployment, stream=False, began=began, first_byte=None)
    response = HttpResponse(answer.body, content_type="application/json")
    _gateway_headers(response, call, deployment)
    response["x-gateway-cost-usd"] = micro_usd_to_str(call.charged_micro_usd)
    if call.cache_key is not None:
        response["x-gateway-cache"] = "miss"
        await response_cache.store(
            call.cache_key,
            response_cache.Entry(
                body=answer.body, events=[], deployment_id=deployment.id, usage=usage
            ),
        )
    if call.claim is not None:
        await idempotency.complete(
            call.claim, idempotency.Stored(200, _replayable_headers(response), body=answer.body)
        )
    admission.apply_headers(response, ticket)
    return response


async def _serve_hit(
    call: Call, table: RoutingTable, hit: response_cache.Entry
) -> HttpResponseBase:
    """A cached answer: no provider call, one ledger row marked as a cache hit.

    It is admitted like any request: it counts against the rate limits with its exact
    usage, and when hits are billed (GATEWAY_CACHE_BILL_HITS) it reserves its cost
    first and settles what its ledger row charged, so the budget counters stay equal
    to the ledger. An unbilled hit reserves nothing.
    """
    deployment = table.deployments.get(hit.deployment_id)
    billed = settings.GATEWAY_CACHE_BILL_HITS and deployment is not None
    ticket = await admission.admit(
        principal=call.principal,
        request_id=call.request_id,
        prompt_tokens=hit.usage.prompt_tokens,
        # The usage is known exactly: it is the bound.
        prompt_tokens_bound=hit.usage.prompt_tokens,
        max_output_tokens=hit.usage.completion_tokens,
        prices=deployment.prices if billed and deployment is not None else FREE,
    )
    call.attempts = 1
    try:
        record = _record(
            call,
            deployment,
            status=LedgerStatus.SUCCESS,
            usage=hit.usage,
            http_status=200,
            cache_hit=True,
        )
        await _write(call, record)
    finally:
        await admission.settle(ticket, call.charged_micro_usd)
    response: HttpResponseBase
    if hit.events:
        events = list(hit.events)

        async def again() -> AsyncIterator[bytes]:
            for event in events:
                yield event

        response = StreamingHttpResponse(again(), content_type="text/event-stream")
    else:
        response = HttpResponse(hit.body, content_type="application/json")
    _gateway_headers(response, call, deployment)
    response["x-gateway-cost-usd"] = micro_usd_to_str(call.charged_micro_usd)
    response["x-gateway-cache"] = "hit"
    admission.apply_headers(response, ticket)
    if call.claim is not None:
        await idempotency.complete(
            call.claim,
            idempotency.Stored(
                200,
                _replayable_headers(response),
                body=hit.body,
                events=hit.events,
                stream=bool(hit.events),
            ),
        )
    return response


async def _stream(
    call: Call,
    table: RoutingTable,
    group: str,
    deployment: Deployment,
    ticket: admission.Ticket,
    began: datetime,
) -> HttpResponseBase:
    body = _upstream_body(call)
    body["stream"] = True
    options = body.get("stream_options") or {}
    client_wants_usage = bool(options.get("include_usage"))
    if call.endpoint.asks_for_usage:
        # Always ask for the usage chunk: it is what the stream is billed from.
        body["stream_options"] = {**options, "include_usage": True}
    handle = await call.endpoint.open_stream(deployment, body, call.headers)
    relay = StreamRelay(
        call,
        table,
        group,
        deployment,
        ticket,
        handle,
        began,
        call.endpoint.tracker(client_wants_usage),
    )
    # The pump runs in a fresh context so it can finish billing after the client's
    # request is torn down (Django refuses ORM work from a finished request's context).
    _spawn(relay.pump())
    response = StreamingHttpResponse(relay.client_events(), content_type="text/event-stream")
    response["cache-control"] = "no-cache"
    response["x-accel-buffering"] = "no"
    _gateway_headers(response, call, deployment)
    if call.cache_key is not None:
        response["x-gateway-cache"] = "miss"
    relay.headers = _replayable_headers(response)
    admission.apply_headers(response, ticket)
    return response


class StreamRelay:
    """Moves SSE events from the provider to the client, and bills the stream.

    The pump (provider side) and the client side are decoupled by a bounded queue:
    while the client reads slowly the pump waits (backpressure to the provider); if
    the client hangs up, the pump stops waiting and keeps reading (up to
    STREAM_DRAIN_SECONDS) so the provider's own usage count is what gets billed,
    then writes the ledger row.
    """

    def __init__(
        self,
        call: Call,
        table: RoutingTable,
        group: str,
        deployment: Deployment,
        ticket: admission.Ticket,
        handle: upstream.StreamHandle,
        began: datetime,
        tracker: Tracker,
    ) -> None:
        self.call = call
        self.table = table
        self.group = group
        self.deployment = deployment
        self.ticket = ticket
        self.handle = handle
        self.began = began
        self.tracker = tracker
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(STREAM_QUEUE_EVENTS)
        # Everything sent to the client, kept for an idempotent replay or the cache.
        self.sent: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.client_gone = False
        self.delivered = False
        self._drain_deadline: asyncio.Timeout | None = None
        # Events received from the provider, and tokens of the text already folded
        # out of the kept events (see STREAM_FOLD_BYTES).
        self._received = 0
        self._folded_tokens = 0

    async def _send(self, event: bytes) -> None:
        if self.call.claim is not None or self.call.cache_key is not None:
            self.sent.append(event)
        await self._put(event)

    async def _put(self, item: bytes | None) -> None:
        if self.client_gone:
            return  # nobody reads the queue any more
        try:
            async with asyncio.timeout(STREAM_CLIENT_STALL_SECONDS):
                await self.queue.put(item)
        except TimeoutError:
            self._client_left()
            # Should the client read again, its response ends (without the end
            # marker, so it cannot pass for a complete answer).
            self.queue.put_nowait(None)

    def _client_left(self) -> None:
        self.client_gone = True
        # Nobody will read what is queued: drop it, which also frees a pump that
        # waits for room in the queue.
        while not self.queue.empty():
            self.queue.get_nowait()
        # Only while the pump still reads (a finished Timeout cannot be rescheduled).
        if self._drain_deadline is not None:
            self._drain_deadline.reschedule(
                asyncio.get_running_loop().time() + STREAM_DRAIN_SECONDS
            )

    async def client_events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    self.delivered = True
                    return
                yield item
        finally:
            if not self.delivered:
                self._client_left()

    async def pump(self) -> None:
        events: list[bytes] = []
        kept_bytes = 0
        failure: upstream.UpstreamError | None = None
        first_byte: datetime | None = None
        ttft_ms: int | None = None
        try:
            async with asyncio.timeout(None) as deadline:
                self._drain_deadline = deadline
                if self.client_gone:
                    self._client_left()
                async for event in self.handle.events:
                    if ttft_ms is None:
                        first_byte = datetime.now()
                        ttft_ms = int((time.monotonic() - self.call.started_mono) * 1000)
                    self._received += 1
                    events.append(event)
                    kept_bytes += len(event)
                    if kept_bytes > STREAM_FOLD_BYTES:
                        # Once the provider reported usage the text is not needed.
                        if self.tracker.usage is None:
                            self._folded_tokens += count_text(
                                self.deployment.provider_model, stream_text(events)
                            )
                        events.clear()
                        kept_bytes = 0
                    forward = self.tracker.feed(event)
                    if forward is not None and not self.client_gone:
                        await self._send(forward)
            if self.tracker.provider_error is not None:
                failure = upstream.UpstreamError(
                    502, upstream.sanitise(self.tracker.provider_error), partial=True
                )
            elif not self.tracker.ended:
                failure = upstream.UpstreamError(
                    502,
                    "The provider's stream ended before it was complete.",
                    "connection",
                    partial=True,
                )
        except upstream.UpstreamError as exc:
            failure = exc
        except TimeoutError:
            failure = upstream.UpstreamError(504, "stream drain timed out", "timeout", partial=True)
        except Exception as exc:  # a bug must still bill and end the stream cleanly
            logger.exception("stream pump failed for %s", self.call.request_id)
            failure = upstream.UpstreamError(502, str(exc), "connection", partial=True)
        finally:
            self._drain_deadline = None  # finished: nothing left to reschedule
            if self.handle.close is not None:
                # Closing a connection that already died may fail; nothing to do then.
                with contextlib.suppress(Exception):
                    await self.handle.close()
        await self._finish(events, failure, first_byte, ttft_ms)

    async def _finish(
        self,
        events: list[bytes],
        failure: upstream.UpstreamError | None,
        first_byte: datetime | None,
        ttft_ms: int | None,
    ) -> None:
        call, deployment, tracker = self.call, self.deployment, self.tracker
        usage = tracker.usage
        estimated = usage is None
        if usage is None and self._received:
            usage = Usage(
                prompt_tokens=call.prompt_tokens,
                completion_tokens=self._folded_tokens
                + count_text(deployment.provider_model, stream_text(events)),
            )
        if self.client_gone:
            status = LedgerStatus.CLIENT_DISCONNECTED
        elif failure is not None:
            status = LedgerStatus.PARTIAL if self._received else LedgerStatus.ERROR
        else:
            status = LedgerStatus.SUCCESS
        record = _record(
            call,
            deployment,
            status=status,
            usage=usage,
            estimated=estimated,
            http_status=200 if failure is None else failure.status,
            error_type=failure.kind if failure else "",
            ttft_ms=ttft_ms,
        )
        written = False
        try:
            await _write(call, record)
            written = True
        except Exception:
            logger.exception("ledger write failed for stream %s", call.request_id)
        try:
            await admission.settle(self.ticket, call.charged_micro_usd)
        except Exception:
            logger.exception("settling reservation failed for %s", call.request_id)
        try:
            if failure is None:
                await breaker.succeeded(
                    self.table,
                    self.group,
                    deployment,
                    stream=True,
                    began=self.began,
                    first_byte=first_byte,
                )
            else:
                await breaker.failed(
                    self.table,
                    self.group,
                    deployment,
                    self.table.policy(self.group),
                    status=failure.status,
                    retry_after=None,
                    counts=True,
                    stream=True,
                    began=self.began,
                )
        except Exception:
            logger.exception("router feedback failed for %s", call.request_id)
        if failure is None and written:
            for event in tracker.finish(micro_usd_to_str(call.charged_micro_usd)):
                await self._send(event)
            await self._remember(usage)
        else:
            if call.claim is not None:
                await idempotency.release(call.claim)
            error = (
                client_error(failure)
                if failure is not None
                else GatewayError(
                    "The response could not be recorded; it was not completed. Retry the request.",
                    503,
                    "server_error",
                    "ledger_unavailable",
                )
            )
            # An error event instead of the end marker: the client sees a failure,
            # never a silently truncated success.
            await self._put(call.endpoint.error_event(error))
        await self._put(None)

    async def _remember(self, usage: Usage | None) -> None:
        call = self.call
        if self.tracker.answer is not None and usage is not None:
            await response_ids.remember(
                call.endpoint.name, call.principal, call.body, self.tracker.answer, usage
            )
        if call.claim is not None:
            await idempotency.complete(
                call.claim, idempotency.Stored(200, self.headers, events=self.sent, stream=True)
            )
        if call.cache_key is not None and usage is not None:
            await response_cache.store(
                call.cache_key,
                response_cache.Entry(
                    body=b"", events=self.sent, deployment_id=self.deployment.id, usage=usage
                ),
            )


async def count_message_tokens(request: HttpRequest) -> dict[str, int]:
    """Anthropic's /v1/messages/count_tokens: the provider's count where it has one."""
    principal = await authenticate(request)
    body = parse_json_body(request)
    validation.refuse_overrides(body)
    probe = {**body, "max_tokens": 1}
    parsed = validation.validate_messages(probe)
    table = await routing_tables.get()
    plan(principal, table, parsed.model, None)
    deployment = table.group(parsed.model)[0]
    if deployment.provider == "anthropic":
        url, headers = upstream.anthropic_target(
            deployment, {k.lower(): v for k, v in request.headers.items()}
        )
        payload = upstream.passthrough_payload(
            deployment,
            {k: v for k, v in body.items() if k in ("model", "messages", "system", "tools")},
        )
        try:
            answer = await upstream.passthrough_json(
                (url + "/count_tokens", headers), deployment, payload
            )
            return {"input_tokens": int(answer.data["input_tokens"])}
        except (upstream.UpstreamError, KeyError, TypeError, ValueError):
            logger.warning("provider token count failed; counting locally")
    from gateway.dialects import MESSAGES

    return {
        "input_tokens": await count_prompt(
            MESSAGES, deployment.provider_model, body, len(request.body)
        )
    }
