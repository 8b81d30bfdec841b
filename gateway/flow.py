"""The data-plane request flow, shared by every endpoint, both dialects and batch lines.

    plan (the model and its fallback chain) → idempotency and cache → admit (reserve
      budget, count rate limits) → attempts: pick a deployment, call the provider, one
      ledger row per attempt, retry or fall back on retryable errors → settle the
      reservation → a `Result`

The HTTP edge (gateway.http) authenticates, parses and validates the request before
`run`, and turns the `Result` into a response; a batch line (gateway.batch_runner)
uses the `Result` as its output. A stream's events are relayed and billed by
gateway.relay.

A ledger row is written before the answer is complete: for JSON before `run` returns,
for a stream before its end marker (`data: [DONE]`, `message_stop`,
`response.completed`) is sent. So a response a client has fully received always has
its row, even if the process is killed right after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, TypeVar

from django.conf import settings

from accounts.auth import KeyPrincipal
from billing import admission, recorder
from billing.models import LedgerStatus
from billing.pricing import Usage, micro_usd_to_str
from core import errors
from core.aio import spawn
from core.errors import GatewayError
from gateway import (
    breaker,
    failures,
    idempotency,
    response_cache,
    response_ids,
    upstream,
    validation,
)
from gateway.call import Call, Result, attempt_row, record
from gateway.dialects import Endpoint, text_bytes
from gateway.relay import StreamRelay
from gateway.routing import Deployment, RoutingTable, routing_tables

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

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


# --- the flow ------------------------------------------------------------------------------------

# Walking and counting a prompt costs CPU in proportion to its size: an 8 MB prompt's
# token count holds the event loop for about a second, and validating 100k tiny
# messages for over a second more, stalling every other request of the worker.
# Above this size that work runs in a thread (tiktoken releases the GIL while it
# encodes); below it, inline, since a thread hop would cost more than the work.
INLINE_COUNT_MAX_BYTES = 64 * 1024


async def by_size(size: int, work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)`, in a thread when the body is large enough to stall the loop."""
    if size <= INLINE_COUNT_MAX_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


async def count_prompt(endpoint: Endpoint, model: str, body: dict[str, Any], size: int) -> int:
    return await by_size(size, endpoint.count_prompt, model, body)


async def run(
    call: Call,
    fallbacks: tuple[str, ...] | None,
    *,
    idempotency_key: str | None = None,
    body_size: int = 0,
    reserve: bool = True,
    detach: bool = False,
) -> Result:
    """The request, from its model's fallback chain to its answer.

    `fallbacks` are those the request named (None: the model's configured ones).
    `body_size` is the raw body's size (larger prompts are counted off the event loop).
    `reserve=False` admits nothing: a batch line rerun that is charged nothing.
    `detach=True` runs the provider calls in their own task, so a caller that is
    cancelled (a client that hangs up) cancels only its wait, never the call and its
    ledger row.
    """
    principal, endpoint, body = call.principal, call.endpoint, call.body
    table = await routing_tables.get()
    chain = plan(principal, table, call.model, fallbacks)
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
        if call.cache_key is not None:
            hit = await response_cache.lookup(call.cache_key)
            if hit is not None:
                return await _serve_hit(call, table, hit)
        call.prompt_tokens = await count_prompt(
            endpoint, table.group(call.model)[0].provider_model, body, body_size
        )
        if reserve:
            ticket = await admit_call(call, table, chain)
        else:
            ticket = admission.Ticket(
                reservation_id=admission.NO_TICKET_NEEDED, amount=0, budgets=[], settled=True
            )
    except BaseException:
        if call.claim is not None:
            await idempotency.release(call.claim)
        raise
    if not detach:
        return await _settled_attempts(call, table, chain, ticket)
    # From here a provider may be called, so the work runs in its own task.
    work = spawn(_settled_attempts(call, table, chain, ticket))
    work.add_done_callback(_forget)
    return await asyncio.shield(work)


def _forget(task: asyncio.Task[Any]) -> None:
    # The client may have left: nobody else will look at the outcome.
    if not task.cancelled() and task.exception() is not None:
        logger.debug("request finished after its client left: %s", task.exception())


async def _settled_attempts(
    call: Call, table: RoutingTable, chain: list[str], ticket: admission.Ticket
) -> Result:
    try:
        return await _attempts(call, table, chain, ticket)
    except BaseException:
        if not ticket.settled:
            await admission.settle(ticket, call.charged_micro_usd)
        if call.claim is not None:
            await idempotency.release(call.claim)
        raise


def _again(events: list[bytes]) -> AsyncIterator[bytes]:
    async def again() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    return again()


def _replay(stored: idempotency.Stored) -> Result:
    return Result(
        {**stored.headers, "idempotent-replayed": "true"},
        body=b"" if stored.stream else stored.body,
        events=_again(list(stored.events)) if stored.stream else None,
        status=stored.status,
    )


async def _attempts(
    call: Call, table: RoutingTable, chain: list[str], ticket: admission.Ticket
) -> Result:
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
                kind = failures.classify(exc)
                await record(
                    call,
                    deployment,
                    attempt_row(
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
                    raise failures.client_error(exc) from exc
                if kind == "context":
                    queue = _fallback_queue(call, table, policy.context_window_fallbacks)
                    break
                if kind == "content_policy":
                    if not policy.content_policy_fallbacks:
                        raise failures.client_error(exc) from exc
                    queue = _fallback_queue(call, table, policy.content_policy_fallbacks)
                    break
                if kind == "deployment" or retry == policy.num_retries:
                    break
                wait = failures.backoff(
                    retry, exc, policy.retry_backoff_seconds, policy.max_retry_after_seconds
                )
                if wait is None:
                    break
                await asyncio.sleep(wait)
    if last is not None:
        raise failures.client_error(last)
    if not tried_any and _too_long(call, table, call.model):
        raise GatewayError(
            f"The prompt ({call.prompt_tokens} tokens) is longer than '{call.model}' accepts, "
            "and no model with a larger context is configured as its fallback.",
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        )
    raise failures.no_deployment(call.model)


def _fallback_queue(call: Call, table: RoutingTable, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if table.group(n) and table.may_use(call.principal, n)]


def _too_long(call: Call, table: RoutingTable, group: str) -> bool:
    limits = [d.context_length for d in table.group(group) if d.context_length]
    return bool(limits) and call.prompt_tokens > max(limits)


def _gateway_headers(
    headers: dict[str, str], call: Call, deployment: Deployment | None
) -> dict[str, str]:
    headers["x-gateway-request-id"] = call.request_id
    headers["x-gateway-attempts"] = str(call.attempts)
    if deployment is not None:
        headers["x-gateway-model"] = deployment.provider_model
    return headers


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


def _replayable(result: Result) -> dict[str, str]:
    """The headers an idempotent replay repeats (idempotency.REPLAYED_HEADERS)."""
    found = {**result.headers, "content-type": result.content_type}
    return {
        name: value
        for name in idempotency.REPLAYED_HEADERS
        if (value := found.get(name)) is not None
    }


async def _json(
    call: Call,
    table: RoutingTable,
    group: str,
    deployment: Deployment,
    ticket: admission.Ticket,
    began: datetime,
) -> Result:
    answer = await call.endpoint.call_json(deployment, _upstream_body(call), call.headers)
    usage = call.endpoint.usage_from_json(answer.data)
    estimated = usage is None
    if usage is None:
        usage = Usage(prompt_tokens=call.prompt_tokens)
    row = attempt_row(
        call,
        deployment,
        status=LedgerStatus.SUCCESS,
        usage=usage,
        estimated=estimated,
        http_status=200,
    )
    await record(call, deployment, row)
    await admission.settle(ticket, call.charged_micro_usd)
    await response_ids.remember(call.endpoint.name, call.principal, call.body, answer.data, usage)
    await breaker.succeeded(table, group, deployment, stream=False, began=began, first_byte=None)
    result = Result(
        _gateway_headers({}, call, deployment),
        content_type="application/json",
        body=answer.body,
        data=answer.data,
    )
    result.headers["x-gateway-cost-usd"] = micro_usd_to_str(call.charged_micro_usd)
    if call.cache_key is not None:
        result.headers["x-gateway-cache"] = "miss"
        await response_cache.store(
            call.cache_key,
            response_cache.Entry(
                body=answer.body, events=[], deployment_id=deployment.id, usage=usage
            ),
        )
    if call.claim is not None:
        await idempotency.complete(
            call.claim, idempotency.Stored(200, _replayable(result), body=answer.body)
        )
    result.headers.update(ticket.headers)
    return result


async def _serve_hit(call: Call, table: RoutingTable, hit: response_cache.Entry) -> Result:
    """A cached answer: no provider call, one ledger row marked as a cache hit.

    It is admitted like any request: it counts against the rate limits with its exact
    usage, and when hits are billed (billing.recorder.cache_hit_prices) it reserves its
    cost first and settles what its ledger row charged, so the budget counters stay
    equal to the ledger. An unbilled hit reserves nothing.
    """
    deployment = table.deployments.get(hit.deployment_id)
    ticket = await admission.admit(
        principal=call.principal,
        request_id=call.request_id,
        prompt_tokens=hit.usage.prompt_tokens,
        # The usage is known exactly: it is the bound.
        prompt_tokens_bound=hit.usage.prompt_tokens,
        max_output_tokens=hit.usage.completion_tokens,
        prices=recorder.cache_hit_prices(deployment.prices if deployment else None),
    )
    call.attempts = 1
    try:
        row = attempt_row(
            call,
            deployment,
            status=LedgerStatus.SUCCESS,
            usage=hit.usage,
            http_status=200,
            cache_hit=True,
        )
        await record(call, deployment, row)
    finally:
        await admission.settle(ticket, call.charged_micro_usd)
    result = Result(
        _gateway_headers({}, call, deployment),
        content_type="text/event-stream" if hit.events else "application/json",
        body=b"" if hit.events else hit.body,
        events=_again(list(hit.events)) if hit.events else None,
    )
    result.headers["x-gateway-cost-usd"] = micro_usd_to_str(call.charged_micro_usd)
    result.headers["x-gateway-cache"] = "hit"
    result.headers.update(ticket.headers)
    if call.claim is not None:
        await idempotency.complete(
            call.claim,
            idempotency.Stored(
                200,
                _replayable(result),
                body=hit.body,
                events=hit.events,
                stream=bool(hit.events),
            ),
        )
    return result


async def _stream(
    call: Call,
    table: RoutingTable,
    group: str,
    deployment: Deployment,
    ticket: admission.Ticket,
    began: datetime,
) -> Result:
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
    spawn(relay.pump())
    headers = _gateway_headers(
        {"cache-control": "no-cache", "x-accel-buffering": "no"}, call, deployment
    )
    if call.cache_key is not None:
        headers["x-gateway-cache"] = "miss"
    result = Result(headers, content_type="text/event-stream", events=relay.client_events())
    if call.claim is not None:
        relay.headers = _replayable(result)
    headers.update(ticket.headers)
    return result
