"""Middleware shared by every part of the site. Pure async: no thread hop per request."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware

from core.errors import GatewayError
from core.http import dialect_for_path, error_response

_API_ROOTS = ("/v1", "/api", "/health")


def is_api_path(path: str) -> bool:
    """Paths answered in JSON only: the data plane, the management API, health."""
    return any(path == root or path.startswith(root + "/") for root in _API_ROOTS)


def _as_api_error(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """Turn a framework error page (404, 405, 500…) on an API path into our JSON shape."""
    status = response.status_code
    messages = {
        404: f"Unknown route {request.method} {request.path}; see /api/docs for the API.",
        405: f"Method {request.method} is not allowed on {request.path}.",
    }
    error = GatewayError(
        messages.get(status, "The gateway failed to handle this request; it has been logged."),
        status,
        "invalid_request_error" if status < 500 else "server_error",
        {404: "not_found", 405: "method_not_allowed"}.get(status, "internal_error"),
    )
    replacement = error_response(error, dialect=dialect_for_path(request.path))
    if status == 405 and response.has_header("Allow"):
        replacement["Allow"] = response["Allow"]
    return replacement


def _finish(request: HttpRequest, response: HttpResponse, request_id: str) -> HttpResponse:
    if (
        response.status_code >= 400
        and is_api_path(request.path)
        and not response.get("content-type", "").startswith("application/json")
    ):
        response = _as_api_error(request, response)
    response["x-request-id"] = request_id
    return response


@sync_and_async_middleware
def RequestIdMiddleware(
    get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]],
) -> Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]:
    """Gives every request an id, echoed as `x-request-id` on every response."""
    from asgiref.sync import iscoroutinefunction

    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponse:
            request_id = f"req_{uuid.uuid4().hex}"
            request.request_id = request_id  # type: ignore[attr-defined]
            response = await get_response(request)
            return _finish(request, response, request_id)

        return middleware

    def sync_middleware(request: HttpRequest) -> HttpResponse:
        request_id = f"req_{uuid.uuid4().hex}"
        request.request_id = request_id  # type: ignore[attr-defined]
        response = get_response(request)
        return _finish(request, response, request_id)  # type: ignore[arg-type]

    return sync_middleware
