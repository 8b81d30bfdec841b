"""The single NinjaAPI: the /v1 data plane and the /api/admin management API.

Domain errors are rendered once, here: OpenAI's error shape everywhere, and
Anthropic's on /v1/messages.
"""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError as ModelValidationError
from django.db import DataError
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from billing.api import router as billing_router
from core.errors import GatewayError
from core.http import dialect_for_path, error_response
from gateway.api_admin import router as admin_router
from gateway.api_batches import router as batches_router
from gateway.api_v1 import router as v1_router

logger = logging.getLogger(__name__)

api = NinjaAPI(
    title="LLM Gateway",
    version="1.0",
    description="OpenAI- and Anthropic-compatible gateway with virtual keys, budgets and a ledger.",
    docs_url="api/docs",
    openapi_url="api/openapi.json",
    urls_namespace="api",
)
api.add_router("v1/", v1_router)
api.add_router("v1/", batches_router)
api.add_router("api/admin/", admin_router)
api.add_router("api/admin/", billing_router)


@api.exception_handler(GatewayError)
def _gateway_error(request: HttpRequest, exc: GatewayError) -> HttpResponse:
    return error_response(exc, dialect=dialect_for_path(request.path))


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    first = exc.errors[0] if exc.errors else {}
    location = [
        str(part)
        for part in first.get("loc", ())
        if part not in ("body", "payload", "query", "path")
    ]
    param = ".".join(location) or None
    message = str(first.get("msg", "Invalid request."))
    if param:
        message = f"Invalid '{param}': {message}."
    return error_response(
        GatewayError(message, 400, "invalid_request_error", "invalid_parameter", param),
        dialect=dialect_for_path(request.path),
    )


@api.exception_handler(ModelValidationError)
def _model_validation_error(request: HttpRequest, exc: ModelValidationError) -> HttpResponse:
    # A value the schema let through but the table cannot hold (too many decimal
    # places, too long): still the client's to fix, so a 400 naming the field.
    if hasattr(exc, "error_dict"):
        field, problems = next(iter(exc.error_dict.items()))
        message = f"Invalid '{field}': {' '.join(m for e in problems for m in e.messages)}"
        param: str | None = field
    else:
        message, param = " ".join(exc.messages), None
    return error_response(
        GatewayError(message, 400, "invalid_request_error", "invalid_parameter", param),
        dialect=dialect_for_path(request.path),
    )


@api.exception_handler(DataError)
def _data_error(request: HttpRequest, exc: DataError) -> HttpResponse:
    # Postgres text cannot hold NUL: psycopg refuses such a string when a query or a
    # row carries it. That is the client's value to fix, not a server failure.
    if "NUL" not in str(exc):
        return _unexpected(request, exc)
    return error_response(
        GatewayError(
            "A string in the request contains a NUL (\\u0000) character, which the gateway "
            "cannot store or search for; remove it.",
            400,
            "invalid_request_error",
            "invalid_parameter",
        ),
        dialect=dialect_for_path(request.path),
    )


@api.exception_handler(AuthenticationError)
def _auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(
        GatewayError(
            "Missing or wrong admin token: send 'Authorization: Bearer $GATEWAY_ADMIN_TOKEN'.",
            401,
            "invalid_request_error",
            "invalid_admin_token",
        )
    )


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return error_response(
        GatewayError(str(exc), exc.status_code, "invalid_request_error"),
        dialect=dialect_for_path(request.path),
    )


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    logger.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(
        GatewayError(
            "The gateway failed to handle this request; it has been logged. "
            f"Quote request id {getattr(request, 'request_id', '?')} when reporting it.",
            500,
            "server_error",
            "internal_error",
        ),
        dialect=dialect_for_path(request.path),
    )
