"""The OpenAI-compatible data plane under /v1. Thin: the HTTP edge is gateway.http, the flow
gateway.flow."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from ninja import Router

from accounts.auth import authenticate
from billing.api import SpendOut, spend_report
from core.errors import GatewayError
from core.http import json_response
from gateway import catalog, dialects
from gateway import http as edge
from gateway.routing import routing_tables

router = Router(tags=["OpenAI-compatible"])

_BODY_DOC = {
    "requestBody": {
        "content": {"application/json": {"schema": {"type": "object"}}},
        "required": True,
        "description": "The OpenAI request body, as the official SDK sends it.",
    }
}


@router.post("/chat/completions", openapi_extra=_BODY_DOC, summary="Create a chat completion")
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    return await edge.handle(request, dialects.CHAT)


@router.post("/completions", openapi_extra=_BODY_DOC, summary="Create a legacy completion")
async def completions(request: HttpRequest) -> HttpResponseBase:
    return await edge.handle(request, dialects.COMPLETIONS)


@router.post("/embeddings", openapi_extra=_BODY_DOC, summary="Create embeddings")
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    return await edge.handle(request, dialects.EMBEDDINGS)


@router.post(
    "/responses", openapi_extra=_BODY_DOC, summary="Create a model response (Responses API)"
)
async def responses(request: HttpRequest) -> HttpResponseBase:
    return await edge.handle(request, dialects.RESPONSES)


@router.post(
    "/messages",
    openapi_extra=_BODY_DOC,
    summary="Create a message (Anthropic Messages API)",
    tags=["Anthropic-compatible"],
)
async def messages(request: HttpRequest) -> HttpResponseBase:
    return await edge.handle(request, dialects.MESSAGES)


@router.post(
    "/messages/count_tokens",
    openapi_extra=_BODY_DOC,
    summary="Count a message's input tokens (Anthropic Messages API)",
    tags=["Anthropic-compatible"],
)
async def count_tokens(request: HttpRequest) -> HttpResponse:
    return json_response(await edge.count_message_tokens(request))


@router.get("/models", summary="List the models this key may use")
async def list_models(request: HttpRequest) -> HttpResponse:
    principal = await authenticate(request)
    table = await routing_tables.get()
    return json_response({"object": "list", "data": catalog.models_for(table, principal)})


@router.get("/models/{path:model_id}", summary="Describe one model")
async def get_model(request: HttpRequest, model_id: str) -> HttpResponse:
    principal = await authenticate(request)
    table = await routing_tables.get()
    if not table.group(model_id) or not table.may_use(principal, model_id):
        raise GatewayError(
            f"The model '{model_id}' does not exist or this key may not use it.",
            404,
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    return json_response(catalog.model_card(table, model_id))


def _budget_view(report: SpendOut | None) -> dict[str, object] | None:
    if report is None:
        return None
    return {
        "limit_usd": report.budget_usd,
        "period": report.period,
        "spent_usd": report.spent_usd,
        "reserved_usd": report.reserved_usd,
        "remaining_usd": report.remaining_usd,
        "resets_at": report.period_end.isoformat() if report.period_end else None,
    }


@router.get("/key", summary="This key's limits, budget, spend this period and reset time")
async def key_info(request: HttpRequest) -> HttpResponse:
    principal = await authenticate(request)
    own = await spend_report(
        scope="key",
        owner_id=principal.key_id,
        limit=principal.key_budget_micro_usd,
        period_kind=principal.key_budget_period,
        tz=principal.team_timezone,
    )
    team = None
    if principal.team_budget_micro_usd is not None:
        team = await spend_report(
            scope="team",
            owner_id=principal.team_id,
            limit=principal.team_budget_micro_usd,
            period_kind=principal.team_budget_period,
            tz=principal.team_timezone,
        )
    return json_response(
        {
            "object": "key",
            "id": principal.key_id,
            "name": principal.key_name,
            "team": {"id": principal.team_id, "name": principal.team_name},
            "models": sorted(principal.allowed_models) or None,
            "expires_at": principal.key_expires_at.isoformat()
            if principal.key_expires_at
            else None,
            "spend": {
                "period": own.period,
                "spent_usd": own.spent_usd,
                "resets_at": own.period_end.isoformat() if own.period_end else None,
                "by_model": [m.model_dump() for m in own.by_model],
            },
            "budget": _budget_view(own) if own.budget_usd is not None else None,
            "team_budget": _budget_view(team),
            "rate_limits": {
                "rpm": principal.key_rpm_limit,
                "tpm": principal.key_tpm_limit,
                "team_rpm": principal.team_rpm_limit,
                "team_tpm": principal.team_tpm_limit,
            },
        }
    )
