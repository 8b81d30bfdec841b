"""JSON responses: the one error response builder, and plain JSON bodies."""

from __future__ import annotations

import orjson
from django.http import HttpResponse

from core.errors import GatewayError


def json_response(
    data: object, status: int = 200, content_type: str = "application/json"
) -> HttpResponse:
    return HttpResponse(orjson.dumps(data), status=status, content_type=content_type)


def error_body(error: GatewayError, dialect: str = "openai") -> bytes:
    """The error's JSON body in the dialect's shape (for an edge that writes raw ASGI)."""
    return orjson.dumps(error.anthropic_body() if dialect == "anthropic" else error.openai_body())


def error_response(error: GatewayError, *, dialect: str = "openai") -> HttpResponse:
    response = HttpResponse(
        error_body(error, dialect), status=error.status, content_type="application/json"
    )
    for name, value in error.headers.items():
        response[name] = value
    return response


def dialect_for_path(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "openai"
