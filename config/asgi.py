"""ASGI entry point.

Two Django handlers share one process: the data plane (/v1, /health) runs with
only the request-id middleware, because every sync middleware (sessions, CSRF,
messages) costs a thread hop per request under ASGI; everything else (dashboard,
management API) gets the full stack.

Every request body, on every route, is limited before routing or authentication
(`limit_body`): from Content-Length when it is given, otherwise by counting the
bytes as they arrive, so a chunked body is cut off with a 413 after at most its
route's limit plus one read buffer, never read whole into memory or a temp file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from io import BytesIO
from typing import IO, Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, ASGIRequest, get_script_prefix
from django.urls import set_script_prefix

full_site = get_asgi_application()

# Imported once at start-up (litellm takes seconds to import), never per request.
import gateway.http  # noqa: E402, F401
from core.errors import body_too_large  # noqa: E402
from core.http import dialect_for_path, error_body  # noqa: E402
from gateway import upstream  # noqa: E402


class DataPlaneRequest(ASGIRequest):
    """A data-plane request: its body was already bounded while it was read.

    DATA_UPLOAD_MAX_MEMORY_SIZE is the full site's (small) limit; the data plane's own
    limits (GATEWAY_MAX_BODY_BYTES, GATEWAY_FILE_MAX_BYTES) were enforced by
    `limit_body`, so `body` does not re-check Content-Length against the site's.
    """

    @property
    def body(self) -> bytes:
        if not hasattr(self, "_body"):
            self._body = self.read()
            self._stream = BytesIO(self._body)
        return self._body


class DataPlaneHandler(ASGIHandler):
    """Django's ASGI handler minus what costs the data plane a thread per request.

    The stock handler runs each request in its own thread-sensitive context, sends
    `request_started` (sync receivers: a thread hop) and closes the response through
    sync_to_async (another). Data-plane views never touch Django's per-request
    database connections (they use core.db.run_db), so here the signal is skipped
    and the response closed inline: no thread is started or woken per request.
    """

    request_class = DataPlaneRequest

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

    async def _read(self, scope: Any, receive: Any) -> tuple[IO[bytes], int]:
        """The body, and its size. Already bounded by `limit_body` as it arrives."""
        if scope["path"] == "/v1/files":
            # Uploads may be large: Django spools them to disk past
            # FILE_UPLOAD_MAX_MEMORY_SIZE, and the multipart parser streams from there.
            spooled = await self.read_body(receive)
            size = spooled.seek(0, 2)
            spooled.seek(0)
            return spooled, size
        # A JSON call is parsed whole anyway, and it is at most GATEWAY_MAX_BODY_BYTES:
        # keep it in memory (no temp file, no thread hop to write one).
        body = BytesIO()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestAborted
            body.write(message.get("body", b""))
            if not message.get("more_body", False):
                break
        size = body.tell()
        body.seek(0)
        return body, size

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            body_file, size = await self._read(scope, receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is not None and "CONTENT_LENGTH" not in request.META:
            # A chunked body: the multipart parser reads only CONTENT_LENGTH bytes.
            request.META["CONTENT_LENGTH"] = str(size)
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


def _content_length(scope: dict[str, Any]) -> int | None:
    """The declared body size; None when the body is chunked (or the header is bad)."""
    length: int | None = None
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return None  # never trust a Content-Length next to a transfer coding
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


def _is_data_plane(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in _DATA_PLANE_ROOTS)


def _body_limit(path: str) -> int:
    if path == "/v1/files":
        # Batch input files are uploads, allowed to be far larger than one request.
        return int(settings.GATEWAY_FILE_MAX_BYTES)
    if _is_data_plane(path):
        return int(settings.GATEWAY_MAX_BODY_BYTES)
    # Dashboard forms, /login/ and the management API take small bodies.
    return int(settings.GATEWAY_SITE_MAX_BODY_BYTES)


async def _refuse_too_large(scope: dict[str, Any], send: Any, limit: int) -> None:
    payload = error_body(body_too_large(limit), dialect_for_path(scope["path"]))
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
                # The rest of the body is never read: the connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def limit_body(app: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Run `app` with the request body limited to its route's size, before anything else.

    With a Content-Length the server itself never hands over more than that, so the
    header alone decides (the fast path: nothing is wrapped). A chunked body is counted
    as each piece arrives; the piece that passes the limit is not handed on: the app is
    told the client left (Django then stops reading and answers nothing) and the
    client gets the 413 instead. If the app had already begun its answer, the 413
    cannot be sent; the connection is simply dropped.
    """
    path = scope.get("path", "")
    limit = _body_limit(path)
    declared = _content_length(scope)
    if declared is not None:
        if declared > limit:
            await _refuse_too_large(scope, send, limit)
            return
        await app(scope, receive, send)
        return

    received = 0
    refused = False
    started = False

    async def counted_receive() -> dict[str, Any]:
        nonlocal received, refused
        if refused:
            return {"type": "http.disconnect"}
        message: dict[str, Any] = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                refused = True
                if not started:
                    await _refuse_too_large(scope, send, limit)
                return {"type": "http.disconnect"}
        return message

    async def guarded_send(message: dict[str, Any]) -> None:
        nonlocal started
        if refused:
            return  # the 413 was the answer; nothing of the app's may follow it
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    await app(scope, counted_receive, guarded_send)


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
    if scope["type"] != "http":
        await full_site(scope, receive, send)
        return
    app = data_plane if _is_data_plane(scope.get("path", "")) else full_site
    await limit_body(app, scope, receive, send)
