"""The OpenAI-compatible data plane under /v1. Thin: the flow lives in gateway.proxy."""

from __future__ import annotations

import orjson
from django.http import HttpRequest, HttpResponse
from ninja import Router

from gateway import catalog, proxy
from gateway.auth import authenticate
from gateway.errors import GatewayError
from gateway.routing import routing_tables

router = Router(tags=["OpenAI-compatible"])

_BODY_DOC = {
    "requestBody": {
        "content": {"application/json": {"schema": {"type": "object"}}},
        "required": True,
        "description": "The OpenAI request body, as the official SDK sends it.",
    }
}


def _json(data: object, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(data), status=status, content_type="application/json")


@router.post("/chat/completions", openapi_extra=_BODY_DOC, summary="Create a chat completion")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await proxy.handle(request, proxy.CHAT)


@router.post("/embeddings", openapi_extra=_BODY_DOC, summary="Create embeddings")
async def embeddings(request: HttpRequest) -> HttpResponse:
    return await proxy.handle(request, proxy.EMBEDDINGS)


@router.get("/models", summary="List the models this key may use")
async def list_models(request: HttpRequest) -> HttpResponse:
    principal = await authenticate(request)
    table = await routing_tables.get()
    return _json({"object": "list", "data": catalog.models_for(table, principal)})


@router.get("/models/{path:model_id}", summary="Describe one model")
async def get_model(request: HttpRequest, model_id: str) -> HttpResponse:
    principal = await authenticate(request)
    table = await routing_tables.get()
    if not table.group(model_id) or not principal.may_use(model_id):
        raise GatewayError(
            f"The model '{model_id}' does not exist or this key may not use it.",
            404,
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    return _json(catalog.model_card(table, model_id))
