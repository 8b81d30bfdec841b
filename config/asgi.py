"""ASGI entry point.

Two Django handlers share one process: the data plane (/v1, /health) runs with
only the request-id middleware, because every sync middleware (sessions, CSRF,
messages) costs a thread hop per request under ASGI; everything else (dashboard,
management API) gets the full stack. Oversized bodies are refused with 413 from
Content-Length alone, before Django reads a byte of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from typing import Any

import orjson

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix

full_site = get_asgi_application()

# Imported once at start-up (litellm takes seconds to import), never per request.
import gateway.proxy  # noqa: E402, F401
from gateway import upstream  # noqa: E402
from gateway.errors import body_too_large, dialect_for_path  # noqa: E402


class DataPlaneHandler(ASGIHandler):
    """Django's ASGI handler minus what costs the data plane a thread per request.

    The stock handler runs each request in its own thread-sensitive context, sends
    `request_started` (sync receivers: a thread hop) and closes the response through
    sync_to_async (another). Data-plane views never touch Django's per-request
    database connections (they use gateway.db.run_db), so here the signal is skipped
    and the response closed inline: no thread is started or woken per request.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        # BaseHandler reads settings.MIDDLEWARE; give it the data plane's short list
        # for the duration of this one-time set-up.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.DATA_PLANE_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send)

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            if error_response is not None:
                await self.send_response(error_response, send)
                error_response.close()
            return

        async def process_request() -> Any:
            response = await self.run_get_response(request)
            # The client may leave while we send; the view has billed by then.
            with contextlib.suppress(asyncio.CancelledError):
                await self.send_response(response, send)
            return response

        # As Django does: watch for the client leaving while the response is made,
        # so a stream's generator is cancelled (and its pump bills what was made).
        listener = asyncio.create_task(self.listen_for_disconnect(receive))
        worker = asyncio.create_task(process_request())
        await asyncio.wait([listener, worker], return_when=asyncio.FIRST_COMPLETED)
        for task in (listener, worker):
            if task.done():
                with contextlib.suppress(RequestAborted):
                    task.result()
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not worker.cancelled() and worker.exception() is None:
            worker.result().close()
        body_file.close()


data_plane = DataPlaneHandler()
_DATA_PLANE_ROOTS = ("/v1", "/health")


def _content_length(scope: dict[str, Any]) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _body_limit(path: str) -> int:
    # Batch input files are uploads, allowed to be far larger than one request.
    return (
        settings.GATEWAY_FILE_MAX_BYTES if path == "/v1/files" else settings.GATEWAY_MAX_BODY_BYTES
    )


async def _refuse_too_large(scope: dict[str, Any], send: Any) -> None:
    error = body_too_large(_body_limit(scope["path"]))
    body = (
        error.anthropic_body()
        if dialect_for_path(scope["path"]) == "anthropic"
        else error.openai_body()
    )
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        # Import did all the setting up; at shutdown (after the server has finished the
        # requests in flight) close the upstream connection pool.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await upstream.close_sessions()
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope.get("path", "")
    if any(path == root or path.startswith(root + "/") for root in _DATA_PLANE_ROOTS):
        if _content_length(scope) > _body_limit(path):
            await _refuse_too_large(scope, send)
            return
        await data_plane(scope, receive, send)
    else:
        await full_site(scope, receive, send)
