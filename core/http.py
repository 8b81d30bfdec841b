"""Rendering a GatewayError as an HTTP response: the one error response builder."""

from __future__ import annotations

import orjson
from django.http import HttpResponse

from core.errors import GatewayError


def error_response(error: GatewayError, *, dialect: str = "openai") -> HttpResponse:
    body = error.anthropic_body() if dialect == "anthropic" else error.openai_body()
    response = HttpResponse(
        orjson.dumps(body), status=error.status, content_type="application/json"
    )
    for name, value in error.headers.items():
        response[name] = value
    return response


def dialect_for_path(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "openai"
