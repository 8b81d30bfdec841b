"""OpenAI Files and Batches, and Anthropic Message Batches, for the mock upstream.

``app.MockUpstream`` dispatches here (this module imports nothing from ``app``; the app hands
it a line runner). Every line of a batch is answered by the same handler and fault controls as
a live call with that body, so a line's ``usage`` equals what a live call returns and billing
can be checked against it. State is in memory, per process, bounded (oldest evicted first)
and forgotten by POST /_mock/reset.

OpenAI routes (also without ``/v1``, and under Azure's ``/openai/...?api-version=``)
    POST   /v1/files                multipart ``file`` + ``purpose`` (assistants, batch,
                                    fine-tune, vision, user_data, evals); purpose "batch"
                                    needs a ``.jsonl`` filename, like OpenAI
    GET    /v1/files                ``after``, ``limit`` (1..10000), ``order`` (desc), ``purpose``
    GET    /v1/files/{id}           the file object
    GET    /v1/files/{id}/content   the bytes
    DELETE /v1/files/{id}           {"id", "object": "file", "deleted": true}
    POST   /v1/batches              input_file_id, endpoint (/v1/chat/completions,
                                    /v1/completions, /v1/embeddings, /v1/responses),
                                    completion_window "24h", metadata
    GET    /v1/batches              ``after``, ``limit`` (1..100, default 20), newest first
    GET    /v1/batches/{id}         the batch (advances it, see Progress)
    POST   /v1/batches/{id}/cancel  validating / in_progress -> cancelling
    Errors use OpenAI's shape: 404 for an unknown file or batch, 400 for a bad purpose,
    endpoint, completion_window or metadata, 409 to cancel a batch that already ended.

    Lifecycle: validating -> in_progress -> finalizing -> completed; validating -> failed when
    the input file is bad (``errors.data`` entries with ``code`` and 1-based ``line``:
    empty_file, invalid_json_line, missing_required_parameter, invalid_method, url_mismatch,
    duplicate_custom_id, model_mismatch (base model names differ), too_many_tasks);
    in_progress -> expired; validating / in_progress -> cancelling -> cancelled. Lines run when
    the batch leaves in_progress. The output file (purpose "batch_output") holds the 200 lines,
    the error file every other line, each as
    ``{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"},
    "error": null}``; a line cut off by expiry or cancellation has ``"response": null`` and
    ``"error": {"code": "batch_expired" | "batch_cancelled", "message"}`` and counts neither
    as completed nor as failed. Either file id is null when it would be empty, and both are
    set only once the batch is completed / expired / cancelled. ``usage`` sums the successful
    lines (input, cached, output, reasoning tokens).

Anthropic routes (also without ``/v1``)
    POST   /v1/messages/batches               {"requests": [{"custom_id", "params"}]}
    GET    /v1/messages/batches               ``after_id``, ``before_id``, ``limit`` (1..1000)
    GET    /v1/messages/batches/{id}          the batch (advances it, see Progress)
    GET    /v1/messages/batches/{id}/results  JSONL, in request order:
                                              {"custom_id", "result": {"type": "succeeded",
                                              "message"} | {"type": "errored", "error":
                                              <Anthropic error body>} | {"type": "canceled"}
                                              | {"type": "expired"}}; 404 before it ended
    POST   /v1/messages/batches/{id}/cancel   in_progress -> canceling
    DELETE /v1/messages/batches/{id}          only once ended (else 400)
    A succeeded message is the live /v1/messages answer for its params with
    ``usage.service_tier`` "batch" (the token counts are the live call's).
    Lifecycle: in_progress -> ended; in_progress -> canceling -> ended. ``request_counts``
    keep everything in ``processing`` until the batch ends, as Anthropic documents.
    ``results_url`` points back at this server (from the Host header). Create refuses with 400
    an empty or oversized ``requests``, a bad or duplicate ``custom_id``; bad ``params`` give
    an errored result, as upstream.

Progress (tests never sleep)
    advance=get      (default) each GET of the batch moves it one state before answering:
                     OpenAI needs three GETs from validating to completed, Anthropic one
                     (the anthropic SDK's results() retrieves the batch first, so it counts);
                     lists, file reads and results downloads never advance anything
    advance=instant  the first GET runs it to its end state
    advance=manual   only POST /_mock/batches/{id}/advance moves it (one state per call)
    expire=1         the batch expires instead of finishing (OpenAI: in_progress -> expired;
                     Anthropic: ended with "expired" results)
    done=N           with expire or cancel: the first N lines still run (default 0)
    Set them, later sources winning, by: the environment (MOCK_BATCH_ADVANCE), model-string
    markers on the batch's first line (``mock-gpt;batch_advance=manual;batch_expire=1;
    batch_done=2``, which reaches the mock through a gateway), OpenAI ``metadata``
    (``mock_advance``, ``mock_expire``, ``mock_done``) or ``x-mock-batch-advance`` /
    ``-expire`` / ``-done`` headers on the create call.
    POST /_mock/batches/{id}/advance   one step; answers the provider's batch object
    POST /_mock/batches/{id}/expire    expire now (runs ``done`` lines), answers the batch

Partial failures
    A line's model string carries the usual fault controls (``mock-gpt;status=500``,
    ``;status=400;error_code=content_policy_violation``, ``;fail_first=2``, ``;fail_rate=0.5``);
    the line then gets that error as its response (OpenAI: in the error file with that
    status_code; Anthropic: an errored result). Batch lines are counted apart from live calls
    (they do not show in /_mock/stats), so fail_first / fail_rate count lines.

Stats
    GET /_mock/batch_stats -> {"file_uploads", "batch_creates", "creates_by_input_file":
    {file id: N}, "message_batch_creates", "creates_by_custom_id": {custom_id: N} (Anthropic),
    "lines_by_model": {model string: N}} so a test can assert that exactly one provider batch
    was created for an input.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs

import orjson

from mock_upstream.asgi import Receive, Scope, Send, read_body, send_json

LineRunner = Callable[[str, dict[str, Any]], tuple[int, bytes]]
# A bound route: awaits (status, body, headers or None for JSON) or raises ApiError.
RouteResult = tuple[int, bytes, list[tuple[bytes, bytes]] | None]
Route = Callable[[Scope, Receive], Awaitable[RouteResult]]

# Bounded so a long test run cannot grow the process without limit; oldest go first.
MAX_FILES: Final = 1_000
MAX_FILE_BYTES: Final = 256 * 1024 * 1024
MAX_BATCHES: Final = 1_000
MAX_COUNTED_KEYS: Final = 100_000

FILE_PURPOSES: Final = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_ENDPOINTS: Final = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)
OPENAI_MAX_LINES: Final = 50_000
ANTHROPIC_MAX_REQUESTS: Final = 100_000
WINDOW_SECONDS: Final = 24 * 3600
# OpenAI: files with purpose batch (and batch outputs) expire after 30 days by default.
BATCH_FILE_TTL_SECONDS: Final = 30 * 24 * 3600
MAX_REPORTED_ERRORS: Final = 100
ADVANCE_ENV: Final = "MOCK_BATCH_ADVANCE"
ADVANCE_MODES: Final = ("get", "instant", "manual")
_CUSTOM_ID: Final = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

_OPENAI_TERMINAL: Final = ("completed", "failed", "expired", "cancelled")
_EXPIRED_LINE: Final = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
_CANCELLED_LINE: Final = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}

K = TypeVar("K")
V = TypeVar("V")


def _bounded_put(store: OrderedDict[K, V], key: K, value: V, cap: int) -> None:
    store[key] = value
    while len(store) > cap:
        store.popitem(last=False)


def _count(store: OrderedDict[str, int], key: str) -> None:
    _bounded_put(store, key, store.get(key, 0) + 1, MAX_COUNTED_KEYS)


OPENAI: Final = "openai"
ANTHROPIC: Final = "anthropic"
# Anthropic's error type per status, for the statuses these routes answer with.
_ANTHROPIC_ERROR_TYPES: Final = {404: "not_found_error", 409: "invalid_request_error"}


def anthropic_error(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return orjson.dumps({**body, "request_id": _hex_id("req_")})


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    # Not app.openai_error_body: its 404 default code is model_not_found, wrong for files.
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


class ApiError(Exception):
    """A refusal in the dialect of the route that raised it."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _now() -> int:
    return int(time.time())


def _rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _hex_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# --------------------------------------------------------------------------------------------
# Controls


@dataclass(frozen=True, slots=True)
class BatchControls:
    advance: str = "get"
    expire: bool = False
    done: int = 0


def _apply(controls: BatchControls, name: str, value: str) -> BatchControls:
    value = value.strip()
    try:
        if name == "advance" and value.lower() in ADVANCE_MODES:
            return replace(controls, advance=value.lower())
        if name == "expire":
            return replace(controls, expire=value.lower() not in ("", "0", "false", "no", "off"))
        if name == "done":
            return replace(controls, done=max(int(value), 0))
    except ValueError:
        pass
    # Unknown names and unparsable values are ignored, like the live controls.
    return controls


def batch_controls(
    model: str | None, metadata: Any, headers: list[tuple[bytes, bytes]]
) -> BatchControls:
    controls = BatchControls()
    controls = _apply(controls, "advance", os.environ.get(ADVANCE_ENV, "get"))
    if model and ";" in model:
        for segment in model.split(";")[1:]:
            name, sep, value = segment.partition("=")
            name = name.strip().lower().replace("-", "_")
            if sep and name.startswith("batch_"):
                controls = _apply(controls, name[6:], value)
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            if isinstance(key, str) and key.startswith("mock_") and isinstance(value, str):
                controls = _apply(controls, key[5:], value)
    for raw_name, raw_value in headers:
        if raw_name.startswith(b"x-mock-batch-"):
            name = raw_name[13:].decode("latin-1").replace("-", "_")
            controls = _apply(controls, name, raw_value.decode("latin-1"))
    return controls


# --------------------------------------------------------------------------------------------
# Request helpers


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _query(scope: Scope) -> dict[str, str]:
    parsed = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {key: values[-1] for key, values in parsed.items()}


def _limit(query: dict[str, str], default: int, most: int) -> int:
    text = query.get("limit")
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ApiError(400, f"limit must be an integer between 1 and {most}.", "limit")
    return value


_DISPOSITION_PARAM: Final = re.compile(r';\s*([a-zA-Z*]+)="((?:[^"\\]|\\.)*)"')


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename or None, bytes)} of a multipart/form-data body."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or match is None:
        raise ApiError(400, "Send the file as multipart/form-data with 'file' and 'purpose'.")
    delimiter = b"--" + match.group(1).encode("latin-1")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            continue
        params: dict[str, str] = {}
        for line in head.decode("utf-8", errors="replace").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                params = {k.lower(): v for k, v in _DISPOSITION_PARAM.findall(line)}
        if "name" in params:
            fields[params["name"]] = (params.get("filename"), data.removesuffix(b"\r\n"))
    return fields


def _openai_usage(body: dict[str, Any]) -> tuple[int, int, int, int]:
    """(input, cached, output, reasoning) tokens of a chat, completion, embedding or response."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    if "input_tokens" in usage:
        details_in = usage.get("input_tokens_details") or {}
        details_out = usage.get("output_tokens_details") or {}
        return (
            int(usage.get("input_tokens") or 0),
            int(details_in.get("cached_tokens") or 0),
            int(usage.get("output_tokens") or 0),
            int(details_out.get("reasoning_tokens") or 0),
        )
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    return (
        int(usage.get("prompt_tokens") or 0),
        int(details_in.get("cached_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(details_out.get("reasoning_tokens") or 0),
    )


# --------------------------------------------------------------------------------------------
# Stored objects


@dataclass(slots=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    expires_at: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass(slots=True)
class OpenAIBatch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    controls: BatchControls
    # The input file's bytes, captured at create: deleting the file later changes nothing.
    input_data: bytes
    status: str = "validating"
    times: dict[str, int | None] = field(default_factory=dict)
    model: str | None = None
    lines: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: list[dict[str, Any]] | None = None
    # One output-format record per line, in input order, once the lines ran.
    results: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    usage: tuple[int, int, int, int] = (0, 0, 0, 0)
    output_file_id: str | None = None
    error_file_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        input_tokens, cached, output_tokens, reasoning = self.usage
        times = self.times
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": times.get("in_progress_at"),
            "expires_at": self.created_at + WINDOW_SECONDS,
            "finalizing_at": times.get("finalizing_at"),
            "completed_at": times.get("completed_at"),
            "failed_at": times.get("failed_at"),
            "expired_at": times.get("expired_at"),
            "cancelling_at": times.get("cancelling_at"),
            "cancelled_at": times.get("cancelled_at"),
            "request_counts": {
                "total": len(self.lines),
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": input_tokens + output_tokens,
            },
            "metadata": self.metadata,
        }


@dataclass(slots=True)
class MessageBatch:
    id: str
    requests: list[tuple[str, Any]]
    created_at: float
    controls: BatchControls
    results_url: str
    status: str = "in_progress"
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.status == "ended":
            for line in self.results:
                counts[line["result"]["type"]] += 1
        else:
            counts["processing"] = len(self.requests)
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": counts,
            "ended_at": _rfc3339(self.ended_at),
            "created_at": _rfc3339(self.created_at),
            "expires_at": _rfc3339(self.created_at + WINDOW_SECONDS),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(self.cancel_initiated_at),
            "results_url": self.results_url if self.status == "ended" else None,
        }


# --------------------------------------------------------------------------------------------
# The API


class BatchApi:
    """Files, batches and message batches of one MockUpstream."""

    def __init__(self, run_line: LineRunner, lines_by_model: dict[str, int]) -> None:
        self.run_line = run_line
        # The app's batch-line counts (shared dict), reported in /_mock/batch_stats.
        self.lines_by_model = lines_by_model
        self.files: OrderedDict[str, StoredFile] = OrderedDict()
        self.file_bytes = 0
        self.batches: OrderedDict[str, OpenAIBatch] = OrderedDict()
        self.message_batches: OrderedDict[str, MessageBatch] = OrderedDict()
        self.file_uploads = 0
        self.batch_creates = 0
        self.creates_by_input_file: OrderedDict[str, int] = OrderedDict()
        self.message_batch_creates = 0
        self.creates_by_custom_id: OrderedDict[str, int] = OrderedDict()

    def reset(self) -> None:
        self.files.clear()
        self.file_bytes = 0
        self.batches.clear()
        self.message_batches.clear()
        self.file_uploads = 0
        self.batch_creates = 0
        self.creates_by_input_file.clear()
        self.message_batch_creates = 0
        self.creates_by_custom_id.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "file_uploads": self.file_uploads,
            "batch_creates": self.batch_creates,
            "creates_by_input_file": dict(self.creates_by_input_file),
            "message_batch_creates": self.message_batch_creates,
            "creates_by_custom_id": dict(self.creates_by_custom_id),
            "lines_by_model": dict(self.lines_by_model),
        }

    # ---- dispatch ----------------------------------------------------------------------------

    async def dispatch(
        self, scope: Scope, receive: Receive, send: Send, path: str, method: str
    ) -> bool:
        """Answer a files / batches / message-batches / batch-control path; False if not one."""
        if path.startswith("/openai/"):
            # Azure OpenAI: same shapes under /openai/... with ?api-version=.
            path = "/v1/" + path[8:]
        elif path.startswith(("/files", "/batches", "/messages/batches")):
            path = "/v1" + path
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "messages"] and parts[2:3] == ["batches"]:
            dialect, route = ANTHROPIC, self._message_batch_route(parts[3:], method)
        elif parts[:2] in (["v1", "files"], ["v1", "batches"]):
            dialect, route = OPENAI, self._openai_route(parts[1], parts[2:], method)
        elif parts[:2] == ["_mock", "batch_stats"] and len(parts) == 2 and method == "GET":
            await send_json(send, 200, orjson.dumps(self.stats()))
            return True
        elif parts[:2] == ["_mock", "batches"] and len(parts) == 4 and method == "POST":
            dialect = ANTHROPIC if parts[2].startswith("msgbatch_") else OPENAI
            route = self._control_route(parts[2], parts[3])
        else:
            return False
        try:
            if route is None:
                raise ApiError(405, f"{method} is not allowed on {path}.")
            status, body, headers = await route(scope, receive)
        except ApiError as exc:
            if dialect == ANTHROPIC:
                body = anthropic_error(exc.status, exc.message)
            else:
                body = openai_error(exc.status, exc.message, exc.param, exc.code)
            await send_json(send, exc.status, body)
            return True
        if headers is None:
            await send_json(send, status, body)
        else:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        return True

    def _openai_route(self, kind: str, rest: list[str], method: str) -> Route | None:
        routes: dict[tuple[str, int, str], Callable[..., Awaitable[RouteResult]]] = {
            ("files", 0, "POST"): self.file_create,
            ("files", 0, "GET"): self.file_list,
            ("files", 1, "GET"): self.file_retrieve,
            ("files", 1, "DELETE"): self.file_delete,
            ("batches", 0, "POST"): self.batch_create,
            ("batches", 0, "GET"): self.batch_list,
            ("batches", 1, "GET"): self.batch_retrieve,
        }
        handler: Callable[..., Awaitable[RouteResult]] | None
        if kind == "files" and len(rest) == 2 and rest[1] == "content":
            handler = self.file_content if method == "GET" else None
        elif kind == "batches" and len(rest) == 2 and rest[1] == "cancel":
            handler = self.batch_cancel if method == "POST" else None
        elif len(rest) > 1:
            return self._not_found
        else:
            handler = routes.get((kind, len(rest), method))
        if handler is None:
            return None
        return lambda scope, receive: handler(scope, receive, *rest[:1])

    def _message_batch_route(self, rest: list[str], method: str) -> Route | None:
        routes: dict[tuple[int, str, str], Callable[..., Awaitable[RouteResult]]] = {
            (0, "", "POST"): self.message_batch_create,
            (0, "", "GET"): self.message_batch_list,
            (1, "", "GET"): self.message_batch_retrieve,
            (1, "", "DELETE"): self.message_batch_delete,
            (2, "results", "GET"): self.message_batch_results,
            (2, "cancel", "POST"): self.message_batch_cancel,
        }
        if len(rest) > 2:
            return self._not_found
        handler = routes.get((len(rest), rest[1] if len(rest) == 2 else "", method))
        if handler is None:
            known = any(key[:2] == (len(rest), rest[1] if len(rest) == 2 else "") for key in routes)
            return None if known else self._not_found
        return lambda scope, receive: handler(scope, receive, *rest[:1])

    def _control_route(self, batch_id: str, action: str) -> Route | None:
        if action == "advance":
            return lambda scope, receive: self.control_advance(batch_id)
        if action == "expire":
            return lambda scope, receive: self.control_expire(batch_id)
        return self._not_found

    async def _not_found(self, scope: Scope, receive: Receive) -> RouteResult:
        raise ApiError(404, f"Unknown path {scope['path']}; see mock_upstream.batches.")

    # ---- OpenAI files ------------------------------------------------------------------------

    def _file(self, file_id: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None:
            raise ApiError(404, f"No such File object: {file_id}", "id")
        return stored

    def store_file(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        created = _now()
        expires = created + BATCH_FILE_TTL_SECONDS if purpose.startswith("batch") else None
        stored = StoredFile(_hex_id("file-"), filename, purpose, data, created, expires)
        self.files[stored.id] = stored
        self.file_bytes += len(data)
        while len(self.files) > MAX_FILES or (
            self.file_bytes > MAX_FILE_BYTES and len(self.files) > 1
        ):
            _, evicted = self.files.popitem(last=False)
            self.file_bytes -= len(evicted.data)
        return stored

    async def file_create(self, scope: Scope, receive: Receive) -> RouteResult:
        body = await read_body(receive)
        fields = parse_multipart(_header(scope, b"content-type"), body)
        if "purpose" not in fields:
            raise ApiError(
                400,
                "Missing required parameter: 'purpose'.",
                "purpose",
                "missing_required_parameter",
            )
        purpose = fields["purpose"][1].decode("utf-8", errors="replace").strip()
        if purpose not in FILE_PURPOSES:
            allowed = ", ".join(f"'{name}'" for name in FILE_PURPOSES)
            raise ApiError(
                400,
                f"Invalid value for 'purpose': '{purpose}'. Supported values are: {allowed}.",
                "purpose",
                "invalid_value",
            )
        if "file" not in fields or fields["file"][0] is None:
            raise ApiError(
                400, "Missing required parameter: 'file'.", "file", "missing_required_parameter"
            )
        filename, data = fields["file"]
        assert filename is not None
        if purpose == "batch" and not filename.endswith(".jsonl"):
            raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl", "file")
        self.file_uploads += 1
        return 200, orjson.dumps(self.store_file(filename, purpose, data).to_json()), None

    async def file_list(self, scope: Scope, receive: Receive) -> RouteResult:
        query = _query(scope)
        limit = _limit(query, 10_000, 10_000)
        files = list(self.files.values())
        if query.get("order", "desc") != "asc":
            files.reverse()
        if "purpose" in query:
            files = [stored for stored in files if stored.purpose == query["purpose"]]
        return 200, orjson.dumps(_openai_page(files, query.get("after"), limit)), None

    async def file_retrieve(self, scope: Scope, receive: Receive, file_id: str) -> RouteResult:
        return 200, orjson.dumps(self._file(file_id).to_json()), None

    async def file_delete(self, scope: Scope, receive: Receive, file_id: str) -> RouteResult:
        stored = self._file(file_id)
        del self.files[file_id]
        self.file_bytes -= len(stored.data)
        return 200, orjson.dumps({"id": file_id, "object": "file", "deleted": True}), None

    async def file_content(self, scope: Scope, receive: Receive, file_id: str) -> RouteResult:
        data = self._file(file_id).data
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(len(data)).encode()),
        ]
        return 200, data, headers

    # ---- OpenAI batches ----------------------------------------------------------------------

    def _batch(self, batch_id: str) -> OpenAIBatch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", "batch_id")
        return batch

    async def batch_create(self, scope: Scope, receive: Receive) -> RouteResult:
        request = _json_object(await read_body(receive))
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(request.get(name), str):
                raise ApiError(
                    400,
                    f"Missing required parameter: '{name}'.",
                    name,
                    "missing_required_parameter",
                )
        endpoint = _v1(request["endpoint"])
        if endpoint not in BATCH_ENDPOINTS:
            raise ApiError(
                400,
                f"Invalid value: '{request['endpoint']}'. Supported values are: "
                + ", ".join(f"'{name}'" for name in BATCH_ENDPOINTS)
                + ".",
                "endpoint",
                "invalid_value",
            )
        if request["completion_window"] != "24h":
            raise ApiError(
                400,
                f"Invalid value: '{request['completion_window']}'. Supported values are: '24h'.",
                "completion_window",
                "invalid_value",
            )
        metadata = request.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(
                isinstance(key, str) and len(key) <= 64 and isinstance(value, str)
                for key, value in metadata.items()
            )
            and all(len(value) <= 512 for value in metadata.values())
        ):
            raise ApiError(
                400,
                "'metadata' must be an object of at most 16 string keys (64 characters) "
                "and string values (512 characters).",
                "metadata",
            )
        stored = self.files.get(request["input_file_id"])
        if stored is None:
            raise ApiError(404, f"No such File object: {request['input_file_id']}", "input_file_id")
        if stored.purpose != "batch":
            raise ApiError(
                400,
                f"The input file {stored.id} has purpose '{stored.purpose}'; upload it with "
                "purpose 'batch'.",
                "input_file_id",
            )
        controls = batch_controls(_first_line_model(stored.data), metadata, list(scope["headers"]))
        batch = OpenAIBatch(
            id=_hex_id("batch_"),
            endpoint=request["endpoint"],
            input_file_id=stored.id,
            completion_window="24h",
            metadata=metadata,
            created_at=_now(),
            controls=controls,
            input_data=stored.data,
        )
        _bounded_put(self.batches, batch.id, batch, MAX_BATCHES)
        self.batch_creates += 1
        _count(self.creates_by_input_file, stored.id)
        return 200, orjson.dumps(batch.to_json()), None

    async def batch_list(self, scope: Scope, receive: Receive) -> RouteResult:
        query = _query(scope)
        limit = _limit(query, 20, 100)
        batches = list(reversed(self.batches.values()))
        return 200, orjson.dumps(_openai_page(batches, query.get("after"), limit)), None

    async def batch_retrieve(self, scope: Scope, receive: Receive, batch_id: str) -> RouteResult:
        batch = self._batch(batch_id)
        if batch.controls.advance == "get":
            self.step_openai(batch)
        elif batch.controls.advance == "instant":
            while batch.status not in _OPENAI_TERMINAL:
                self.step_openai(batch)
        return 200, orjson.dumps(batch.to_json()), None

    async def batch_cancel(self, scope: Scope, receive: Receive, batch_id: str) -> RouteResult:
        batch = self._batch(batch_id)
        if batch.status not in ("validating", "in_progress"):
            raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.", "batch_id")
        batch.status = "cancelling"
        batch.times["cancelling_at"] = _now()
        return 200, orjson.dumps(batch.to_json()), None

    def step_openai(self, batch: OpenAIBatch) -> None:
        """Move ``batch`` one state along its lifecycle."""
        now = _now()
        if batch.status == "validating":
            errors = self.validate(batch)
            if errors:
                batch.errors = errors[:MAX_REPORTED_ERRORS]
                batch.status = "failed"
                batch.times["failed_at"] = now
            else:
                batch.status = "in_progress"
                batch.times["in_progress_at"] = now
        elif batch.status == "in_progress":
            if batch.controls.expire:
                self.run_openai_lines(batch, batch.controls.done, _EXPIRED_LINE)
                self.publish_files(batch)
                batch.status = "expired"
                batch.times["expired_at"] = now
            else:
                self.run_openai_lines(batch, len(batch.lines), _EXPIRED_LINE)
                batch.status = "finalizing"
                batch.times["finalizing_at"] = now
        elif batch.status == "finalizing":
            self.publish_files(batch)
            batch.status = "completed"
            batch.times["completed_at"] = now
        elif batch.status == "cancelling":
            # Cancelled while validating: nothing was read, so nothing runs.
            if batch.lines:
                self.run_openai_lines(batch, batch.controls.done, _CANCELLED_LINE)
                self.publish_files(batch)
            batch.status = "cancelled"
            batch.times["cancelled_at"] = now

    def validate(self, batch: OpenAIBatch) -> list[dict[str, Any]]:
        """Parse the input file into ``batch.lines``; the errors OpenAI would report, if any."""
        errors: list[dict[str, Any]] = []

        def error(code: str, message: str, line: int | None, param: str | None = None) -> None:
            errors.append({"code": code, "message": message, "param": param, "line": line})

        texts = [
            (number, text)
            for number, text in enumerate(batch.input_data.split(b"\n"), 1)
            if text.strip()
        ]
        if not texts:
            error("empty_file", "The input file is empty.", None)
            return errors
        if len(texts) > OPENAI_MAX_LINES:
            message = f"The input file has more than {OPENAI_MAX_LINES} requests."
            error("too_many_tasks", message, None)
            return errors
        seen: set[str] = set()
        first_model: str | None = None
        lines: list[tuple[str, dict[str, Any]]] = []
        for number, text in texts:
            try:
                line = orjson.loads(text)
            except orjson.JSONDecodeError:
                error("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            if not isinstance(line, dict):
                error("invalid_json_line", "This line is not a JSON object.", number)
                continue
            missing = [
                name
                for name, kind in (
                    ("custom_id", str),
                    ("method", str),
                    ("url", str),
                    ("body", dict),
                )
                if not isinstance(line.get(name), kind)
            ]
            if missing:
                message = f"Missing required parameter: '{missing[0]}'."
                error("missing_required_parameter", message, number, missing[0])
                continue
            if line["method"] != "POST":
                error("invalid_method", "Only the POST method is supported.", number, "method")
                continue
            if _v1(line["url"]) != _v1(batch.endpoint):
                message = (
                    f"The url '{line['url']}' does not match the batch endpoint '{batch.endpoint}'."
                )
                error("url_mismatch", message, number, "url")
                continue
            if line["custom_id"] in seen:
                message = f"The custom_id '{line['custom_id']}' is used more than once."
                error("duplicate_custom_id", message, number, "custom_id")
                continue
            seen.add(line["custom_id"])
            model = line["body"].get("model")
            if isinstance(model, str):
                if first_model is None:
                    first_model = model
                elif model.split(";", 1)[0] != first_model.split(";", 1)[0]:
                    message = "All requests of a batch must use the same model."
                    error("model_mismatch", message, number, "body.model")
                    continue
            lines.append((line["custom_id"], line["body"]))
        if not errors:
            batch.lines = lines
            batch.model = first_model
        return errors

    def run_openai_lines(self, batch: OpenAIBatch, run: int, cut: dict[str, str]) -> None:
        """Answer the first ``run`` lines as live calls would; the rest get the ``cut`` error."""
        path = _v1(batch.endpoint)
        totals = [0, 0, 0, 0]
        for index, (custom_id, body) in enumerate(batch.lines):
            record: dict[str, Any] = {"id": _hex_id("batch_req_"), "custom_id": custom_id}
            if index < run:
                status, reply = self.run_line(path, body)
                parsed = orjson.loads(reply)
                record["response"] = {
                    "status_code": status,
                    "request_id": _hex_id("req_"),
                    "body": parsed,
                }
                record["error"] = None
                if status == 200:
                    batch.completed += 1
                    for slot, value in enumerate(_openai_usage(parsed)):
                        totals[slot] += value
                else:
                    batch.failed += 1
            else:
                record["response"] = None
                record["error"] = dict(cut)
            batch.results.append(record)
        batch.usage = (totals[0], totals[1], totals[2], totals[3])

    def publish_files(self, batch: OpenAIBatch) -> None:
        succeeded = [
            r for r in batch.results if r["response"] and r["response"]["status_code"] == 200
        ]
        others = [r for r in batch.results if r not in succeeded]
        if succeeded:
            data = b"".join(orjson.dumps(record) + b"\n" for record in succeeded)
            name = f"{batch.id}_output.jsonl"
            batch.output_file_id = self.store_file(name, "batch_output", data).id
        if others:
            data = b"".join(orjson.dumps(record) + b"\n" for record in others)
            name = f"{batch.id}_error.jsonl"
            batch.error_file_id = self.store_file(name, "batch_output", data).id

    # ---- Anthropic message batches -----------------------------------------------------------

    def _message_batch(self, batch_id: str) -> MessageBatch:
        batch = self.message_batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"Message batch {batch_id} not found.")
        return batch

    async def message_batch_create(self, scope: Scope, receive: Receive) -> RouteResult:
        request = _json_object(await read_body(receive))
        requests = request.get("requests")
        if not isinstance(requests, list) or not requests:
            raise ApiError(400, "requests: at least one request is required")
        if len(requests) > ANTHROPIC_MAX_REQUESTS:
            raise ApiError(400, f"requests: at most {ANTHROPIC_MAX_REQUESTS} requests per batch")
        seen: set[str] = set()
        parsed: list[tuple[str, Any]] = []
        for index, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                raise ApiError(
                    400,
                    f"requests.{index}.custom_id: must be 1 to 64 letters, digits, '_' or '-'",
                )
            if custom_id in seen:
                raise ApiError(
                    400, f"requests.{index}.custom_id: duplicate custom_id '{custom_id}'"
                )
            seen.add(custom_id)
            params = item.get("params")
            if not isinstance(params, dict):
                raise ApiError(400, f"requests.{index}.params: Field required")
            parsed.append((custom_id, params))
        first_model = parsed[0][1].get("model")
        controls = batch_controls(
            first_model if isinstance(first_model, str) else None, None, list(scope["headers"])
        )
        batch_id = _hex_id("msgbatch_")
        host = _header(scope, b"host") or "127.0.0.1"
        scheme = scope.get("scheme", "http")
        batch = MessageBatch(
            id=batch_id,
            requests=parsed,
            created_at=time.time(),
            controls=controls,
            results_url=f"{scheme}://{host}/v1/messages/batches/{batch_id}/results",
        )
        _bounded_put(self.message_batches, batch.id, batch, MAX_BATCHES)
        self.message_batch_creates += 1
        for custom_id, _ in parsed:
            _count(self.creates_by_custom_id, custom_id)
        return 200, orjson.dumps(batch.to_json()), None

    async def message_batch_list(self, scope: Scope, receive: Receive) -> RouteResult:
        query = _query(scope)
        limit = _limit(query, 20, 1000)
        batches = list(reversed(self.message_batches.values()))
        ids = [batch.id for batch in batches]
        if "after_id" in query and query["after_id"] in ids:
            start = ids.index(query["after_id"]) + 1
            page, has_more = batches[start : start + limit], len(batches) > start + limit
        elif "before_id" in query and query["before_id"] in ids:
            end = ids.index(query["before_id"])
            page, has_more = batches[max(end - limit, 0) : end], end - limit > 0
        else:
            page, has_more = batches[:limit], len(batches) > limit
        body = {
            "data": [batch.to_json() for batch in page],
            "has_more": has_more,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
        return 200, orjson.dumps(body), None

    async def message_batch_retrieve(
        self, scope: Scope, receive: Receive, batch_id: str
    ) -> RouteResult:
        batch = self._message_batch(batch_id)
        if batch.controls.advance in ("get", "instant"):
            # Anthropic has one step to the end, so "instant" and "get" coincide.
            self.step_anthropic(batch)
        return 200, orjson.dumps(batch.to_json()), None

    async def message_batch_results(
        self, scope: Scope, receive: Receive, batch_id: str
    ) -> RouteResult:
        batch = self._message_batch(batch_id)
        if batch.status != "ended":
            raise ApiError(
                404,
                f"Results for message batch {batch_id} are not available until it has ended "
                f"(processing_status is {batch.status}).",
            )
        data = b"".join(orjson.dumps(line) + b"\n" for line in batch.results)
        headers = [
            (b"content-type", b"application/binary"),
            (b"content-length", str(len(data)).encode()),
        ]
        return 200, data, headers

    async def message_batch_cancel(
        self, scope: Scope, receive: Receive, batch_id: str
    ) -> RouteResult:
        batch = self._message_batch(batch_id)
        if batch.status != "in_progress":
            raise ApiError(
                409, f"Message batch {batch_id} cannot be canceled: it is {batch.status}."
            )
        batch.status = "canceling"
        batch.cancel_initiated_at = time.time()
        return 200, orjson.dumps(batch.to_json()), None

    async def message_batch_delete(
        self, scope: Scope, receive: Receive, batch_id: str
    ) -> RouteResult:
        batch = self._message_batch(batch_id)
        if batch.status != "ended":
            raise ApiError(
                400,
                f"Message batch {batch_id} is still {batch.status}; cancel it and wait for it to "
                "end before deleting it.",
            )
        del self.message_batches[batch_id]
        return 200, orjson.dumps({"id": batch_id, "type": "message_batch_deleted"}), None

    def step_anthropic(self, batch: MessageBatch) -> None:
        if batch.status == "ended":
            return
        if batch.status == "canceling":
            self.run_anthropic_lines(batch, batch.controls.done, "canceled")
        elif batch.controls.expire:
            self.run_anthropic_lines(batch, batch.controls.done, "expired")
        else:
            self.run_anthropic_lines(batch, len(batch.requests), "expired")
        batch.status = "ended"
        batch.ended_at = time.time()

    def run_anthropic_lines(self, batch: MessageBatch, run: int, cut: str) -> None:
        for index, (custom_id, params) in enumerate(batch.requests):
            result: dict[str, Any]
            if index >= run:
                result = {"type": cut}
            else:
                status, reply = self.run_line("/v1/messages", params)
                if status == 200:
                    message = orjson.loads(reply)
                    # Anthropic reports the tier it billed; batch lines bill at batch prices.
                    message["usage"]["service_tier"] = "batch"
                    result = {"type": "succeeded", "message": message}
                else:
                    result = {"type": "errored", "error": orjson.loads(reply)}
            batch.results.append({"custom_id": custom_id, "result": result})

    # ---- test controls -----------------------------------------------------------------------

    async def control_advance(self, batch_id: str) -> RouteResult:
        if batch_id.startswith("msgbatch_"):
            message_batch = self._message_batch(batch_id)
            self.step_anthropic(message_batch)
            return 200, orjson.dumps(message_batch.to_json()), None
        batch = self._batch(batch_id)
        self.step_openai(batch)
        return 200, orjson.dumps(batch.to_json()), None

    async def control_expire(self, batch_id: str) -> RouteResult:
        if batch_id.startswith("msgbatch_"):
            message_batch = self._message_batch(batch_id)
            if message_batch.status == "in_progress":
                message_batch.controls = replace(message_batch.controls, expire=True)
            self.step_anthropic(message_batch)
            return 200, orjson.dumps(message_batch.to_json()), None
        batch = self._batch(batch_id)
        if batch.status in ("validating", "in_progress"):
            batch.controls = replace(batch.controls, expire=True)
            while batch.status not in _OPENAI_TERMINAL:
                self.step_openai(batch)
        return 200, orjson.dumps(batch.to_json()), None


# --------------------------------------------------------------------------------------------
# Helpers


def _v1(path: str) -> str:
    """Azure names endpoints without ``/v1``; both mean the same route."""
    return path if path.startswith("/v1/") else "/v1" + path


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}).") from exc
    if not isinstance(request, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return request


def _first_line_model(data: bytes) -> str | None:
    """The model of the first parseable line, where batch-level model markers are read."""
    for text in _nonblank(data):
        try:
            line = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        body = line.get("body") if isinstance(line, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
        return model if isinstance(model, str) else None
    return None


def _nonblank(data: bytes) -> Iterator[bytes]:
    for text in data.split(b"\n"):
        if text.strip():
            yield text


def _openai_page(items: list[Any], after: str | None, limit: int) -> dict[str, Any]:
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": [item.to_json() for item in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(items) > limit,
    }
