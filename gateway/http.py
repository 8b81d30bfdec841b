"""The data plane's HTTP edge: a request into the flow, the flow's `Result` into a response.

    authenticate → parse the body once → validate it (the endpoint's dialect) → the
      flow (gateway.flow.run) → a Django response

Every /v1 endpoint that calls a model goes through `handle`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone

from accounts.auth import authenticate
from core import errors
from core.errors import GatewayError
from gateway import flow, idempotency, response_cache, upstream, validation
from gateway.call import Call, Result
from gateway.dialects import MESSAGES, Endpoint
from gateway.routing import routing_tables

logger = logging.getLogger(__name__)


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


async def handle(request: HttpRequest, endpoint: Endpoint) -> HttpResponseBase:
    started_mono = time.monotonic()
    principal = await authenticate(request)
    body = parse_json_body(request)
    idempotency_key = idempotency.header_value(request.headers.get("idempotency-key"))
    size = len(request.body)
    parsed = await flow.by_size(size, endpoint.validate, body)
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
    # The request's caching headers decide the key; the flow looks it up.
    call.cache_key = response_cache.key_for(principal, request, endpoint.name, call.model, body)
    result = await flow.run(
        call, parsed.fallbacks, idempotency_key=idempotency_key, body_size=size, detach=True
    )
    return respond(result)


def respond(result: Result) -> HttpResponseBase:
    response: HttpResponseBase
    if result.events is not None:
        response = StreamingHttpResponse(
            result.events, status=result.status, content_type=result.content_type
        )
    else:
        response = HttpResponse(result.body, status=result.status, content_type=result.content_type)
    for name, value in result.headers.items():
        response[name] = value
    return response


async def count_message_tokens(request: HttpRequest) -> dict[str, int]:
    """Anthropic's /v1/messages/count_tokens: the provider's count where it has one."""
    principal = await authenticate(request)
    body = parse_json_body(request)
    validation.refuse_overrides(body)
    probe = {**body, "max_tokens": 1}
    parsed = validation.validate_messages(probe)
    table = await routing_tables.get()
    flow.plan(principal, table, parsed.model, None)
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
    return {
        "input_tokens": await flow.count_prompt(
            MESSAGES, deployment.provider_model, body, len(request.body)
        )
    }
