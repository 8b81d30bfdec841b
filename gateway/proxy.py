"""The data-plane request flow, shared by every OpenAI-dialect endpoint.

    parse → authenticate → validate → route → admit (reserve budget, rate limits)
          → call the provider → ledger row → settle the reservation → respond

A ledger row is written before the response is complete: for JSON before the
response is returned, for a stream before `data: [DONE]` is sent. So a response a
client has fully received always has its row, even if the process is killed
right after.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import litellm
import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils import timezone

from billing import admission
from billing.ledger import AttemptRecord, ledger_write
from billing.models import LedgerStatus
from billing.pricing import Usage, charged_cost_micro_usd, list_cost_micro_usd, micro_usd_to_str
from gateway import errors, idempotency, upstream, validation
from gateway.auth import KeyPrincipal, authenticate
from gateway.db import run_db
from gateway.errors import GatewayError
from gateway.routing import Deployment, RoutingTable, routing_tables

logger = logging.getLogger(__name__)

CHAT = "chat.completions"
EMBEDDINGS = "embeddings"

_USAGE = re.compile(rb'"usage"\s*:\s*\{')

# Streams whose client left keep being read for this long, so that what the
# provider generated (and will bill us for) is known and billed.
STREAM_DRAIN_SECONDS = 60.0

# Tasks that outlive their request (stream pumps); kept so they are not collected.
_background: set[asyncio.Task[Any]] = set()


@dataclass
class Call:
    """One client request on its way through the gateway."""

    request_id: str
    endpoint: str
    principal: KeyPrincipal
    model: str
    body: dict[str, Any]
    stream: bool
    started_at: datetime
    started_mono: float
    end_user: str = ""
    tags: list[str] = field(default_factory=list)
    attempts: int = 0
    claim: idempotency.Claim | None = None


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


async def _route(principal: KeyPrincipal, model: str) -> tuple[RoutingTable, list[Deployment]]:
    table = await routing_tables.get()
    group = table.group(model)
    if not group:
        raise GatewayError(
            f"The model '{model}' does not exist. GET /v1/models lists the models your key can use.",
            404,
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    if not principal.may_use(model):
        raise GatewayError(
            f"This key may not use the model '{model}'. GET /v1/models lists the models it can use.",
            403,
            "permission_error",
            "model_not_allowed",
            "model",
        )
    return table, group


async def _pick(table: RoutingTable, call: Call, group: list[Deployment]) -> Deployment:
    if len(group) == 1:
        return group[0]
    try:
        chosen = await table.router.async_get_available_deployment(
            model=call.model,
            messages=call.body.get("messages"),
            input=call.body.get("input"),
            request_kwargs={},
        )
    except Exception as exc:
        raise GatewayError(
            f"No deployment of '{call.model}' is available right now; retry shortly.",
            503,
            "server_error",
            "no_deployment_available",
        ) from exc
    return table.deployments.get(chosen["model_info"]["id"], group[0])


# --- usage and cost ---------------------------------------------------------------------


def usage_from(data: dict[str, Any] | None) -> Usage | None:
    """OpenAI-convention usage from an OpenAI (or litellm-translated) usage object."""
    if not isinstance(data, dict):
        return None
    prompt = int(data.get("prompt_tokens") or data.get("input_tokens") or 0)
    completion = int(data.get("completion_tokens") or data.get("output_tokens") or 0)
    prompt_details = data.get("prompt_tokens_details") or data.get("input_tokens_details") or {}
    completion_details = (
        data.get("completion_tokens_details") or data.get("output_tokens_details") or {}
    )
    cached = int(prompt_details.get("cached_tokens") or data.get("cache_read_input_tokens") or 0)
    writes = int(data.get("cache_creation_input_tokens") or 0)
    reasoning = int(completion_details.get("reasoning_tokens") or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_read_tokens=cached,
        cache_write_tokens=writes,
        reasoning_tokens=reasoning,
    )


def count_prompt_tokens(deployment_model: str, body: dict[str, Any]) -> int:
    try:
        if "messages" in body:
            return int(
                litellm.token_counter(
                    model=deployment_model,
                    messages=body["messages"],
                    tools=body.get("tools"),
                    # Never fetch an image URL just to count its tokens.
                    use_default_image_token_count=True,
                )
            )
        value = body.get("input")
        texts = (
            [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
        )
        counted = sum(int(litellm.token_counter(model=deployment_model, text=t)) for t in texts)
        token_arrays = (
            [v for v in value or [] if isinstance(v, list)] if isinstance(value, list) else []
        )
        return counted + sum(len(a) for a in token_arrays)
    except Exception:
        # The counter failing must not fail the request; bound by bytes instead
        # (a token is never shorter than one byte).
        return len(orjson.dumps(body.get("messages") or body.get("input")))


def _count_text(model: str, text: str) -> int:
    if not text:
        return 0
    try:
        return int(litellm.token_counter(model=model, text=text, count_response_tokens=True))
    except Exception:
        return max(1, len(text.encode()) // 4)


def estimate_stream_completion(model: str, events: list[bytes]) -> int:
    """Completion tokens of a stream the provider reported no usage for."""
    parts: list[str] = []
    for event in events:
        for line in event.split(b"\n"):
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            try:
                chunk = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                continue
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    parts.append(delta["content"])
                for tool_call in delta.get("tool_calls") or []:
                    function = tool_call.get("function") or {}
                    parts.append(str(function.get("name") or ""))
                    parts.append(str(function.get("arguments") or ""))
    return _count_text(model, "".join(parts))


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
) -> AttemptRecord:
    usage = usage or Usage()
    prices = deployment.prices if deployment else None
    list_cost = list_cost_micro_usd(usage, prices) if prices else 0
    charged = charged_cost_micro_usd(usage, prices, call.principal.markup_percent) if prices else 0
    ended = timezone.now()
    return AttemptRecord(
        request_id=call.request_id,
        attempt=call.attempts,
        team_id=call.principal.team_id,
        key_id=call.principal.key_id,
        endpoint=call.endpoint,
        model=call.model,
        status=status,
        started_at=call.started_at,
        ended_at=ended,
        usage=usage,
        usage_estimated=estimated,
        list_cost_micro_usd=list_cost,
        charged_cost_micro_usd=charged,
        deployment_id=deployment.id if deployment else "",
        provider=deployment.provider if deployment else "",
        provider_model=deployment.provider_model if deployment else "",
        http_status=http_status,
        error_type=error_type,
        stream=call.stream,
        latency_ms=int((time.monotonic() - call.started_mono) * 1000),
        ttft_ms=ttft_ms,
        end_user=call.end_user,
        tags=call.tags,
    )


async def _write(record: AttemptRecord) -> None:
    await run_db(ledger_write, [record])


# --- error mapping ------------------------------------------------------------------------


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


# --- the flow -----------------------------------------------------------------------------------


def _gateway_headers(response: HttpResponse, call: Call, deployment: Deployment | None) -> None:
    response["x-gateway-request-id"] = call.request_id
    response["x-gateway-attempts"] = str(call.attempts)
    if deployment is not None:
        response["x-gateway-model"] = deployment.provider_model


def _upstream_body(call: Call) -> dict[str, Any]:
    body = {k: v for k, v in call.body.items() if k not in validation.GATEWAY_PARAMS}
    # `metadata` is ours (tags); a provider only sees it for stored completions.
    metadata = call.body.get("metadata")
    if call.body.get("store") and isinstance(metadata, dict):
        rest = {k: v for k, v in metadata.items() if k != "tags"}
        if rest:
            body["metadata"] = rest
    return body


async def handle(request: HttpRequest, endpoint: str) -> HttpResponse:
    started_mono = time.monotonic()
    principal = await authenticate(request)
    body = parse_json_body(request)
    idempotency_key = idempotency.header_value(request.headers.get("idempotency-key"))
    if endpoint == EMBEDDINGS:
        model, stream = validation.validate_embeddings(body), False
    else:
        model, stream = validation.validate_chat(body)
    call = Call(
        request_id=request.request_id,  # type: ignore[attr-defined]
        endpoint=endpoint,
        principal=principal,
        model=model,
        body=body,
        stream=stream,
        started_at=timezone.now(),
        started_mono=started_mono,
        end_user=body.get("user") or "",
        tags=validation.tags_from(request.headers.get("x-gateway-tags"), body.get("metadata")),
    )
    table, group = await _route(principal, model)
    if idempotency_key:
        call.claim = await idempotency.claim(
            principal.key_id,
            idempotency_key,
            idempotency.fingerprint({"endpoint": endpoint, "body": body}),
            wait_seconds=settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS,
        )
        if call.claim.replay is not None:
            return _replay(call.claim.replay)
    try:
        prompt_tokens = count_prompt_tokens(group[0].provider_model, body)
        ticket = await admission.admit(
            principal=principal,
            request_id=call.request_id,
            prompt_tokens=prompt_tokens,
            max_output_tokens=_max_output_tokens(call, table),
            prices=table.max_prices(model),
        )
    except BaseException:
        if call.claim is not None:
            await idempotency.release(call.claim)
        raise
    try:
        deployment = await _pick(table, call, group)
        if stream:
            return await _stream(call, deployment, ticket)
        return await _json(call, deployment, ticket)
    except BaseException:
        if not ticket.settled:
            await admission.release(ticket)
        if call.claim is not None:
            await idempotency.release(call.claim)
        raise


def _replay(stored: idempotency.Stored) -> HttpResponse:
    response: HttpResponse
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


def _max_output_tokens(call: Call, table: RoutingTable) -> int:
    if call.endpoint == EMBEDDINGS:
        return 0
    body = call.body
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    n = int(body.get("n") or 1)
    cap = table.max_output_tokens(call.model) or settings.GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS
    return int(requested or cap) * n


async def _json(call: Call, deployment: Deployment, ticket: admission.Ticket) -> HttpResponse:
    call.attempts += 1
    try:
        answer = await upstream.call_json(deployment, call.endpoint, _upstream_body(call))
    except upstream.UpstreamError as exc:
        record = _record(
            call,
            deployment,
            status=LedgerStatus.ERROR,
            usage=None,
            http_status=exc.status,
            error_type=exc.kind,
        )
        await _write(record)
        await admission.settle(ticket, record.charged_cost_micro_usd)
        raise client_error(exc) from exc
    usage = usage_from(answer.data.get("usage"))
    estimated = usage is None
    if usage is None:
        usage = Usage(prompt_tokens=count_prompt_tokens(deployment.provider_model, call.body))
    record = _record(
        call,
        deployment,
        status=LedgerStatus.SUCCESS,
        usage=usage,
        estimated=estimated,
        http_status=200,
    )
    await _write(record)
    await admission.settle(ticket, record.charged_cost_micro_usd)
    response = HttpResponse(answer.body, content_type="application/json")
    _gateway_headers(response, call, deployment)
    response["x-gateway-cost-usd"] = micro_usd_to_str(record.charged_cost_micro_usd)
    if call.claim is not None:
        await idempotency.complete(
            call.claim, idempotency.Stored(200, _replayable_headers(response), body=answer.body)
        )
    admission.apply_headers(response, ticket)
    return response


def _replayable_headers(response: HttpResponse) -> dict[str, str]:
    return {
        name: response[name] for name in idempotency.REPLAYED_HEADERS if response.has_header(name)
    }


async def _stream(call: Call, deployment: Deployment, ticket: admission.Ticket) -> HttpResponse:
    body = _upstream_body(call)
    options = body.get("stream_options") or {}
    client_wants_usage = bool(options.get("include_usage"))
    # Always ask for the usage chunk: it is what the stream is billed from.
    body["stream_options"] = {**options, "include_usage": True}
    call.attempts += 1
    try:
        handle = await upstream.open_stream(deployment, body)
    except upstream.UpstreamError as exc:
        record = _record(
            call,
            deployment,
            status=LedgerStatus.ERROR,
            usage=None,
            http_status=exc.status,
            error_type=exc.kind,
        )
        await _write(record)
        await admission.settle(ticket, record.charged_cost_micro_usd)
        raise client_error(exc) from exc
    relay = StreamRelay(call, deployment, ticket, handle, client_wants_usage)
    # The pump runs in a fresh context so it can finish billing after the client's
    # request is torn down (Django refuses ORM work from a finished request's context).
    task = asyncio.get_running_loop().create_task(relay.pump(), context=contextvars.Context())
    _background.add(task)
    task.add_done_callback(_background.discard)
    response = StreamingHttpResponse(relay.client_events(), content_type="text/event-stream")
    response["cache-control"] = "no-cache"
    response["x-accel-buffering"] = "no"
    _gateway_headers(response, call, deployment)
    relay.headers = _replayable_headers(response)
    admission.apply_headers(response, ticket)
    return response


class StreamRelay:
    """Moves SSE events from the provider to the client, and bills the stream.

    The pump (provider side) and the client side are decoupled by a queue: if the
    client hangs up, the pump keeps reading (up to STREAM_DRAIN_SECONDS) so the
    provider's own usage count is what gets billed, then writes the ledger row.
    """

    def __init__(
        self,
        call: Call,
        deployment: Deployment,
        ticket: admission.Ticket,
        handle: upstream.StreamHandle,
        client_wants_usage: bool,
    ) -> None:
        self.call = call
        self.deployment = deployment
        self.ticket = ticket
        self.handle = handle
        self.client_wants_usage = client_wants_usage
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        # Everything sent to the client, kept for an idempotent replay.
        self.sent: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.client_gone = False
        self.delivered = False
        self._drain_deadline: asyncio.Timeout | None = None

    def _send(self, event: bytes) -> None:
        self.queue.put_nowait(event)
        if self.call.claim is not None:
            self.sent.append(event)

    def _client_left(self) -> None:
        self.client_gone = True
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
        usage: Usage | None = None
        failure: upstream.UpstreamError | None = None
        ttft_ms: int | None = None
        try:
            async with asyncio.timeout(None) as deadline:
                self._drain_deadline = deadline
                if self.client_gone:
                    self._client_left()
                async for event in self.handle.events:
                    if ttft_ms is None:
                        ttft_ms = int((time.monotonic() - self.call.started_mono) * 1000)
                    if event.startswith(b"data: [DONE]"):
                        continue
                    events.append(event)
                    forward = True
                    if _USAGE.search(event):
                        try:
                            chunk = orjson.loads(event[event.index(b"{") :])
                        except (orjson.JSONDecodeError, ValueError):
                            chunk = {}
                        found = usage_from(chunk.get("usage"))
                        if found is not None:
                            usage = found
                        if not self.client_wants_usage and not chunk.get("choices"):
                            forward = False
                    if forward and not self.client_gone:
                        self._send(event)
        except upstream.UpstreamError as exc:
            failure = exc
        except TimeoutError:
            failure = upstream.UpstreamError(504, "stream drain timed out", "timeout", partial=True)
        except Exception as exc:  # a bug must still bill and end the stream cleanly
            logger.exception("stream pump failed for %s", self.call.request_id)
            failure = upstream.UpstreamError(502, str(exc), "connection", partial=True)
        finally:
            if self.handle.close is not None:
                try:
                    await self.handle.close()
                except Exception:  # noqa: S110 - closing a dead connection may fail; nothing to do
                    pass
        await self._finish(events, usage, failure, ttft_ms)

    async def _finish(
        self,
        events: list[bytes],
        usage: Usage | None,
        failure: upstream.UpstreamError | None,
        ttft_ms: int | None,
    ) -> None:
        call, deployment = self.call, self.deployment
        estimated = usage is None
        if usage is None:
            usage = Usage(
                prompt_tokens=count_prompt_tokens(deployment.provider_model, call.body),
                completion_tokens=estimate_stream_completion(deployment.provider_model, events),
            )
        if self.client_gone:
            status = LedgerStatus.CLIENT_DISCONNECTED
        elif failure is not None:
            status = LedgerStatus.PARTIAL if events else LedgerStatus.ERROR
        else:
            status = LedgerStatus.SUCCESS
        record = _record(
            call,
            deployment,
            status=status,
            usage=usage if (events or failure is None) else None,
            estimated=estimated,
            http_status=200 if failure is None else failure.status,
            error_type=failure.kind if failure else "",
            ttft_ms=ttft_ms,
        )
        written = False
        try:
            await _write(record)
            written = True
        except Exception:
            logger.exception("ledger write failed for stream %s", call.request_id)
        try:
            await admission.settle(self.ticket, record.charged_cost_micro_usd)
        except Exception:
            logger.exception("settling reservation failed for %s", call.request_id)
        if failure is None and written:
            cost = micro_usd_to_str(record.charged_cost_micro_usd)
            # SSE comment lines are ignored by clients; this one carries the final cost.
            self._send(f": x-gateway-cost-usd {cost}\n\n".encode())
            self._send(b"data: [DONE]\n\n")
            if call.claim is not None:
                await idempotency.complete(
                    call.claim,
                    idempotency.Stored(200, self.headers, events=self.sent, stream=True),
                )
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
            # An error event instead of [DONE]: the client sees a failure, never a
            # silently truncated success.
            self.queue.put_nowait(b"data: " + orjson.dumps(error.openai_body()) + b"\n\n")
        self.queue.put_nowait(None)
