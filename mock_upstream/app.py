"""The mock upstream LLM server: a raw ASGI app that speaks the OpenAI and Anthropic HTTP APIs.

It is started standalone (``python -m mock_upstream``) by ``make run``, the test-suite
and the benchmark. It deliberately imports neither Django nor litellm and uses no web framework,
so it starts in a fraction of a second and stays far cheaper per request than the gateway it
stands behind.

Endpoints
    POST /v1/chat/completions, /v1/completions, /v1/embeddings   OpenAI dialect
    POST /v1/responses                                            OpenAI Responses API
    POST /v1/messages, /v1/messages/count_tokens                  Anthropic dialect
    GET  /v1/models                                               OpenAI model list
    GET  /_mock/stats, POST /_mock/reset, GET /health             test and ops helpers
    /v1/files, /v1/batches (also under Azure's /openai/),         native batch APIs, in
    /v1/messages/batches, /_mock/batch_stats, /_mock/batches/...  ``mock_upstream.batches``
The provider paths are also accepted without the ``/v1`` prefix, for clients whose base URL
already ends in ``/v1``.

Output
    Deterministic: "Mock reply to: <first 40 chars of the last user message>." followed by
    fixed filler words up to 60 words. The same request always yields the same text (ids and
    ``created`` excepted). With ``tools`` the reply is a tool call whose arguments fill the
    tool's JSON schema (strings "mock", numbers 1, booleans true, enums their first value);
    after a tool result (last message has role "tool" / a ``tool_result`` block) the reply is
    text again unless the tool choice forces a call, so agent loops terminate.

Responses API
    ``input`` is a string (one user message) or a list of items (messages with string or
    ``input_text`` parts, ``function_call``, ``function_call_output``, ...); ``instructions`` is a
    system prompt. The output is one ``message`` item, or one ``function_call`` item for the
    first Responses-style function tool (``{"type": "function", "name", "parameters"}``; a
    chat-style tool is rejected like upstream does) unless ``tool_choice`` is "none" or the
    latest turn carries a ``function_call_output`` (only user messages after it). A
    ``max_output_tokens`` cut gives status "incomplete" (streamed as ``response.incomplete``);
    values below 16 are rejected as upstream does. Streams follow OpenAI's event sequence with
    ``sequence_number``s; the delta events count as content chunks. ``no_usage=1`` sets
    ``usage`` to null, streamed or not.

Token counting rule (stands in for a tokenizer; documented so tests can predict usage)
    tokens(text) = ceil(len(utf-8 bytes of text) / 4)
    chat prompt = sum over messages of (4 + tokens of each text part [+ 85 per image, audio or
        file part] + tokens(name) + tokens(arguments) of each tool call)
        + ceil(len(JSON of the tools array) / 4)
    Anthropic input = the same per message (tool_use: tokens(name) + tokens(JSON input);
        tool_result: its content), + tokens of each system text block,
        + ceil(len(JSON of each tool) / 4)
    Responses input = the chat rule with instructions as a system message and each input
        item as a message (function_call: tokens(name) + tokens(arguments);
        function_call_output: its output; reasoning: its summary texts)
    legacy completions and embeddings: tokens(each prompt string), or len(array) for token
        arrays; no per-message overhead
    completion = tokens(generated text), or tokens(arguments JSON) for a tool call
    OpenAI cached_tokens (chat and Responses): largest multiple of 128 <= prompt_tokens / 2
        once the prompt is >= 1024 tokens (a stand-in for automatic prompt caching), else 0.
    OpenAI reasoning models (name contains "reason" or starts with o1/o3/o4):
        reasoning_tokens = completion_tokens // 2, and completion_tokens includes them.
    Anthropic cache_control: blocks up to and including the last cache_control marker (in the
        order tools, system, messages) are written on first sight of that prefix
        (cache_creation_input_tokens) and read on later requests sharing it
        (cache_read_input_tokens), looking back up to 20 blocks like Anthropic does;
        input_tokens counts only the uncached remainder. No minimum cacheable length.

Controls (fault and shape injection)
    Given as ``;name=value`` segments after the model name (``mock-gpt;status=429;retry_after=2``)
    or as ``x-mock-<name>: value`` request headers (headers win). The model string is echoed back
    verbatim. Unknown names and unparsable values are ignored.
        latency_ms=N        sleep before the response headers
        chunk_delay_ms=N    sleep between SSE frames
        status=CODE         answer with that error in the dialect's error shape (429 adds
                            Retry-After; 529 is Anthropic's overloaded_error)
        retry_after=S       Retry-After seconds (default 1 on 429); also sent as retry-after-ms
        fail_rate=F         fail exactly floor(n*F) of the first n requests for this model
                            string (status default 500)
        fail_first=N        the first N requests for this model string fail (status default 503)
        timeout=1           accept the request and never answer (until the client leaves, 300 s)
        drop_after_chunks=N abort the TCP connection after N content chunks of a stream
        chunks=N            number of content chunks in a stream (default 20)
        output_tokens=N     make the completion exactly N tokens long
        cached_tokens=N     override cached prompt tokens (Anthropic: cache_read_input_tokens)
        reasoning_tokens=N  override reasoning tokens
        no_usage=1          never send the stream usage chunk, even with include_usage
        error_code=CODE     with status=400: OpenAI's error for that code, message included,
                            so gateways can tell them apart: content_policy_violation
                            ("...rejected as a result of our safety system") or
                            context_length_exceeded ("...maximum context length is...")
    Request counts (for fail_rate / fail_first and /_mock/stats) are per full model string and
    are cleared by POST /_mock/reset.

Stats
    GET /_mock/stats -> {"total": N, "by_model": {model string: N}, "by_path": {path: N}}
    counting every POST that reached a provider path, faulted and rejected ones included (a
    request without a readable model counts in total and by_path only). POST /_mock/reset
    zeroes the counts and forgets the Anthropic cache prefixes, stored files and batches.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import math
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final

import orjson

from mock_upstream.asgi import Receive, Scope, Send, read_body, send_json
from mock_upstream.batches import BatchApi

OPENAI: Final = "openai"
ANTHROPIC: Final = "anthropic"

DEFAULT_CHUNKS: Final = 20
DEFAULT_WORDS: Final = 60
EMBEDDING_DIMENSIONS: Final = 8
# Images, audio and files have no text to measure; a flat cost keeps usage predictable.
MEDIA_PART_TOKENS: Final = 85
MESSAGE_OVERHEAD_TOKENS: Final = 4
# The Responses API rejects a smaller max_output_tokens.
RESPONSES_MIN_OUTPUT_TOKENS: Final = 16
CACHE_MIN_PROMPT_TOKENS: Final = 1024
# Anthropic checks for cache hits up to 20 blocks before each breakpoint.
CACHE_LOOKBACK_BLOCKS: Final = 20
# Bounded so a long benchmark cannot grow the process without limit.
MAX_CACHE_PREFIXES: Final = 10_000
TIMEOUT_CONTROL_SECONDS: Final = 300.0
SYSTEM_FINGERPRINT: Final = "fp_mock0001"
MOCK_MODELS: Final = ("mock-gpt", "mock-gpt-mini", "mock-reasoner", "mock-claude", "mock-embed")

_FILLER_SENTENCE: Final = (
    "This deterministic mock answer keeps going so that streaming, usage accounting and "
    "billing have realistic text to work with."
)
_FILLER_WORDS: Final = _FILLER_SENTENCE.split()
_FILLER_TEXT: Final = " " + _FILLER_SENTENCE

_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_DONE: Final = b"data: [DONE]\n\n"

_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class DropConnection(Exception):
    """Raised mid-stream so uvicorn closes the TCP connection (the drop_after_chunks control)."""


class QuietDropFilter(logging.Filter):
    """Hides uvicorn's traceback for deliberate drops; real errors still reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DropConnection)


def install_log_filter() -> None:
    """Call after uvicorn configured logging (it replaces handlers, not logger filters)."""
    logging.getLogger("uvicorn.error").addFilter(QuietDropFilter())


class BadRequest(Exception):
    """A request the real provider would reject with 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# --------------------------------------------------------------------------------------------
# Controls


@dataclass(frozen=True, slots=True)
class Controls:
    latency_ms: int = 0
    chunk_delay_ms: int = 0
    status: int | None = None
    retry_after: float | None = None
    fail_rate: Fraction | None = None
    fail_first: int | None = None
    timeout: bool = False
    drop_after_chunks: int | None = None
    chunks: int = DEFAULT_CHUNKS
    output_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    no_usage: bool = False
    error_code: str | None = None


NO_CONTROLS: Final = Controls()


def _parse_flag(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _parse_rate(value: str) -> Fraction:
    # Fraction("0.1") is exactly 1/10, so "1 in 10" never drifts through float rounding.
    return min(max(Fraction(value.strip()), Fraction(0)), Fraction(1))


def _parse_count(value: str) -> int:
    return max(int(value.strip()), 0)


def _parse_status(value: str) -> int:
    status = int(value.strip())
    if not 400 <= status <= 599:
        raise ValueError("only error statuses can be injected")
    return status


_CONTROL_PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "latency_ms": _parse_count,
    "chunk_delay_ms": _parse_count,
    "status": _parse_status,
    "retry_after": lambda v: max(float(v), 0.0),
    "fail_rate": _parse_rate,
    "fail_first": _parse_count,
    "timeout": _parse_flag,
    "drop_after_chunks": _parse_count,
    "chunks": lambda v: max(int(v), 1),
    "output_tokens": _parse_count,
    "cached_tokens": _parse_count,
    "reasoning_tokens": _parse_count,
    "no_usage": _parse_flag,
    "error_code": lambda v: v.strip() or None,
}


@functools.lru_cache(maxsize=1024)
def _model_controls(model: str) -> tuple[tuple[str, str], ...]:
    """The raw ``;name=value`` pairs of a model string; cached as deployments reuse a few."""
    pairs = []
    for segment in model.split(";")[1:]:
        name, sep, value = segment.partition("=")
        if sep:
            pairs.append((name.strip().lower().replace("-", "_"), value))
    return tuple(pairs)


def parse_controls(model: str, headers: list[tuple[bytes, bytes]]) -> Controls:
    raw: dict[str, str] = dict(_model_controls(model)) if ";" in model else {}
    for name, value in headers:
        if name.startswith(b"x-mock-"):
            key = name[7:].decode("latin-1").replace("-", "_")
            raw[key] = value.decode("latin-1")
    if not raw:
        return NO_CONTROLS
    parsed: dict[str, Any] = {}
    for control, text in raw.items():
        parser = _CONTROL_PARSERS.get(control)
        if parser is None:
            continue
        try:
            parsed[control] = parser(text)
        except (ValueError, ZeroDivisionError):
            continue
    return Controls(**parsed) if parsed else NO_CONTROLS


def base_model(model: str) -> str:
    return model.split(";", 1)[0]


def is_reasoning_model(model: str) -> bool:
    name = base_model(model).lower()
    return "reason" in name or name.startswith(("o1", "o3", "o4"))


# --------------------------------------------------------------------------------------------
# Text, tokens and schemas


def count_tokens(text: str) -> int:
    size = len(text) if text.isascii() else len(text.encode())
    return (size + 3) // 4


def _json_tokens(value: Any) -> int:
    return (len(orjson.dumps(value)) + 3) // 4


def content_tokens(content: Any) -> int:
    """Tokens of a message ``content`` in either dialect: a string or a list of parts."""
    if isinstance(content, str):
        return count_tokens(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += count_tokens(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "tool_use":
            total += count_tokens(str(part.get("name", ""))) + _json_tokens(part.get("input", {}))
        elif kind == "tool_result":
            total += content_tokens(part.get("content"))
        elif isinstance(part.get("text"), str):
            total += count_tokens(part["text"])
        elif isinstance(part.get("thinking"), str):
            total += count_tokens(part["thinking"])
        else:
            total += MEDIA_PART_TOKENS
    return total


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, dict):
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "tool_result":
                texts.append(content_text(part.get("content")))
        elif isinstance(part, str):
            texts.append(part)
    return " ".join(texts)


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    last = messages[-1]
    return content_text(last.get("content")) if isinstance(last, dict) else ""


@functools.lru_cache(maxsize=4096)
def _reply_for_snippet(snippet: str) -> str:
    words = f"Mock reply to: {snippet}.".split()
    filler = 0
    while len(words) < DEFAULT_WORDS:
        words.append(_FILLER_WORDS[filler % len(_FILLER_WORDS)])
        filler += 1
    return " ".join(words)


def reply_text(prompt: str) -> str:
    # Slice before splitting so a huge prompt costs nothing; the cache is keyed on 40 chars.
    return _reply_for_snippet(" ".join(prompt[:400].split())[:40])


def fit_text(text: str, tokens: int, *, pad_words: bool) -> str:
    """Cut or extend ``text`` so that count_tokens() of it is exactly ``tokens``."""
    data = text.encode()
    want = tokens * 4
    if (len(data) + 3) // 4 == tokens:
        return text
    if len(data) > want:
        # Dropping a split UTF-8 character loses at most 3 bytes, so the count stays exact.
        return data[:want].decode(errors="ignore")
    missing = want - len(data)
    if pad_words:
        filler = _FILLER_TEXT * (missing // len(_FILLER_TEXT) + 1)
        return text + filler[:missing]
    # Trailing spaces keep JSON (arguments, json_object replies) valid.
    return text + " " * missing


def split_text(text: str, parts: int) -> list[str]:
    if not text:
        return []
    parts = max(1, min(parts, len(text)))
    size, extra = divmod(len(text), parts)
    pieces = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


_STRING_FORMATS: Final = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "mock@example.com",
    "uri": "https://example.com/mock",
    "url": "https://example.com/mock",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _resolve_ref(ref: str, root: Any) -> Any:
    if not ref.startswith("#/"):
        return {}
    node = root
    for key in ref[2:].split("/"):
        if not isinstance(node, dict):
            return {}
        node = node.get(key.replace("~1", "/").replace("~0", "~"), {})
    return node


def _clamp_number(schema: dict[str, Any], value: float) -> float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(high, int | float) and value > high:
        value = high
    return value


def fill_schema(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A deterministic value satisfying a JSON schema (the common subset tools use)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 12:
        return "mock"
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if isinstance(schema.get("$ref"), str):
        return fill_schema(_resolve_ref(schema["$ref"], root), root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        variants = schema.get(key)
        if isinstance(variants, list) and variants:
            typed = [v for v in variants if not (isinstance(v, dict) and v.get("type") == "null")]
            return fill_schema((typed or variants)[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "string":
        value = _STRING_FORMATS.get(str(schema.get("format")), "mock")
        min_length = schema.get("minLength")
        if isinstance(min_length, int) and len(value) < min_length:
            value = (value * (min_length // len(value) + 1))[:min_length]
        return value
    if kind == "integer":
        return int(_clamp_number(schema, 1))
    if kind == "number":
        return _clamp_number(schema, 1)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if kind == "array":
        min_items = schema.get("minItems")
        count = min_items if isinstance(min_items, int) and min_items > 1 else 1
        return [fill_schema(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {name: fill_schema(sub, root, depth + 1) for name, sub in properties.items()}


@dataclass(slots=True)
class Output:
    """One generated choice: text, why it ended, and its token accounting."""

    text: str
    finish: str  # dialect-neutral: "stop", "length" or "stop_sequence"
    stop_sequence: str | None
    completion_tokens: int
    reasoning_tokens: int


def plan_output(
    text: str,
    controls: Controls,
    *,
    limit: int | None,
    reasoning_model: bool = False,
    stops: list[str] | None = None,
    pad_words: bool = True,
) -> Output:
    override = controls.reasoning_tokens
    if controls.output_tokens is not None:
        total = controls.output_tokens
        reasoning = override if override is not None else total // 2 if reasoning_model else 0
        reasoning = min(reasoning, total)
        text = fit_text(text, total - reasoning, pad_words=pad_words)
    else:
        visible = count_tokens(text)
        reasoning = override if override is not None else visible if reasoning_model else 0
        total = visible + reasoning
    finish = "stop"
    if limit is not None and total > limit:
        total = max(limit, 0)
        reasoning = min(override, total) if override is not None else 0
        if override is None and reasoning_model:
            reasoning = total // 2
        text = fit_text(text, total - reasoning, pad_words=False)
        finish = "length"
    stop_sequence = None
    if stops:
        hits = [(text.find(stop), stop) for stop in stops if stop and stop in text]
        if hits:
            position, stop_sequence = min(hits)
            text = text[:position]
            finish = "stop_sequence"
            total = count_tokens(text) + reasoning
    return Output(text, finish, stop_sequence, total, reasoning)


def _int_field(request: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = request.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"'{name}' must be a non-negative integer", name)
        return value
    return None


def _stop_list(value: Any, param: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise BadRequest(f"'{param}' must be a string or an array of strings", param)


def _given(request: dict[str, Any], name: str, default: Any) -> Any:
    """The request's value for ``name``, or the default the API reports when it is absent."""
    value = request.get(name)
    return default if value is None else value


@functools.lru_cache(maxsize=4096)
def embed(key: bytes, dimensions: int) -> tuple[list[float], str]:
    """A unit vector derived from a hash of the input, as floats and as OpenAI's base64."""
    digest = hashlib.shake_256(key).digest(4 * dimensions)
    raw = [value / 2147483648.0 - 1.0 for value in struct.unpack(f"<{dimensions}I", digest)]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(value / norm for value in raw))
    # Round-trip through float32 so the float and base64 encodings carry identical values.
    floats = list(struct.unpack(f"<{dimensions}f", packed))
    return floats, base64.b64encode(packed).decode()


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# --------------------------------------------------------------------------------------------
# Responses


@dataclass(slots=True)
class Stream:
    """SSE frames, each flagged True when it carries generated content (drop_after_chunks)."""

    frames: list[tuple[bytes, bool]] = field(default_factory=list)


Reply = bytes | Stream


# OpenAI's wording for the 400s a gateway routes on (context-window and content-policy
# fallbacks), for the `error_code` control.
_CODED_ERRORS: Final[dict[str, str]] = {
    "content_policy_violation": (
        "Your request was rejected as a result of our safety system. Your prompt may "
        "contain text that is not allowed by our safety system."
    ),
    "context_length_exceeded": (
        "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9000 tokens. Please reduce the length of the messages."
    ),
}


def openai_error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    kind, default_code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "", None))
    kind = kind or "invalid_request_error"
    code = code or default_code
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def anthropic_error_body(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(
        {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": _new_id("req_"),
        }
    )


def error_body(
    dialect: str, status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    if dialect == ANTHROPIC:
        return anthropic_error_body(status, message)
    return openai_error_body(status, message, param, code)


async def send_stream(send: Send, stream: Stream, controls: Controls) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    delay = controls.chunk_delay_ms / 1000
    drop_after = controls.drop_after_chunks
    sent_content = 0
    for index, (frame, is_content) in enumerate(stream.frames):
        if is_content and drop_after == 0:
            raise DropConnection
        if delay and index:
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": frame, "more_body": True})
        if is_content:
            sent_content += 1
            if sent_content == drop_after:
                raise DropConnection
    await send({"type": "http.response.body", "body": b""})


async def wait_for_disconnect(receive: Receive, seconds: float) -> bool:
    """True when the client went away; False when ``seconds`` passed first."""
    try:
        async with asyncio.timeout(seconds):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The app


Handler = Callable[[dict[str, Any], str, Controls], Reply]


class MockUpstream:
    """The ASGI app. One instance keeps its own counters and Anthropic cache memory."""

    def __init__(self) -> None:
        self.total = 0
        self.by_model: dict[str, int] = {}
        self.by_path: dict[str, int] = {}
        self.cache_prefixes: OrderedDict[bytes, None] = OrderedDict()
        # Batch lines count apart from live calls, so a test can tell a native batch from
        # lines the gateway ran live; fail_rate / fail_first on lines use these counts.
        self.batch_by_model: dict[str, int] = {}
        provider: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": (OPENAI, self.chat_completions),
            "/v1/completions": (OPENAI, self.completions),
            "/v1/embeddings": (OPENAI, self.embeddings),
            "/v1/responses": (OPENAI, self.responses),
            "/v1/messages": (ANTHROPIC, self.messages),
            "/v1/messages/count_tokens": (ANTHROPIC, self.count_tokens),
        }
        self.provider_routes = {**provider, **{path[3:]: route for path, route in provider.items()}}
        models = {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 1700000000, "owned_by": "mock"}
                for name in MOCK_MODELS
            ],
        }
        self.models_body = orjson.dumps(models)
        self.batches = BatchApi(self.run_batch_line, self.batch_by_model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def reset(self) -> None:
        self.total = 0
        self.by_model.clear()
        self.by_path.clear()
        self.cache_prefixes.clear()
        self.batch_by_model.clear()
        self.batches.reset()

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        method: str = scope["method"]
        route = self.provider_routes.get(path)
        if route is not None:
            if method != "POST":
                body = error_body(route[0], 405, f"Use POST for {path}.")
                await send_json(send, 405, body, [(b"allow", b"POST")])
                return
            await self.provider(scope, receive, send, path, *route)
            return
        if await self.batches.dispatch(scope, receive, send, path, method):
            return
        if method == "GET" and path == "/health":
            await send_json(send, 200, b'{"status":"ok"}')
        elif method == "GET" and path == "/_mock/stats":
            stats = {"total": self.total, "by_model": self.by_model, "by_path": self.by_path}
            await send_json(send, 200, orjson.dumps(stats))
        elif method == "POST" and path == "/_mock/reset":
            self.reset()
            await send_json(send, 200, b'{"status":"reset"}')
        elif method == "GET" and path in ("/v1/models", "/models"):
            await send_json(send, 200, self.models_body)
        elif method == "GET" and path.startswith(("/v1/models/", "/models/")):
            model = path.split("/models/", 1)[1]
            entry = {"id": model, "object": "model", "created": 1700000000, "owned_by": "mock"}
            await send_json(send, 200, orjson.dumps(entry))
        else:
            dialect = ANTHROPIC if path.startswith(("/v1/messages", "/messages")) else OPENAI
            message = f"Unknown path {method} {path}; see mock_upstream for the routes."
            await send_json(send, 404, error_body(dialect, 404, message))

    async def provider(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        dialect: str,
        handler: Handler,
    ) -> None:
        self.total += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        body = await read_body(receive)
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            message = f"The request body is not valid JSON ({exc}); send a JSON object."
            await send_json(send, 400, error_body(dialect, 400, message))
            return
        if not isinstance(request, dict):
            message = "The request body must be a JSON object."
            await send_json(send, 400, error_body(dialect, 400, message))
            return
        model = request.get("model")
        if not isinstance(model, str) or not model:
            message = "model: Field required" if dialect == ANTHROPIC else "'model' is required."
            await send_json(send, 400, error_body(dialect, 400, message, "model"))
            return
        seen = self.by_model[model] = self.by_model.get(model, 0) + 1
        controls = parse_controls(model, scope["headers"])
        if controls is not NO_CONTROLS:
            if controls.latency_ms:
                await asyncio.sleep(controls.latency_ms / 1000)
            if controls.timeout:
                if not await wait_for_disconnect(receive, TIMEOUT_CONTROL_SECONDS):
                    message = "Mock upstream timed out on purpose (timeout control)."
                    await send_json(send, 504, error_body(dialect, 504, message))
                return
            status = fault_status(controls, seen)
            if status is not None:
                await self.send_fault(send, dialect, model, controls, status)
                return
        try:
            reply = handler(request, model, controls)
        except BadRequest as exc:
            body = error_body(dialect, 400, exc.message, exc.param, exc.code)
            await send_json(send, 400, body)
            return
        if isinstance(reply, Stream):
            await send_stream(send, reply, controls)
        else:
            await send_json(send, 200, reply)

    async def send_fault(
        self, send: Send, dialect: str, model: str, controls: Controls, status: int
    ) -> None:
        headers = []
        retry_after = controls.retry_after
        if retry_after is None and status == 429:
            retry_after = 1.0
        if retry_after is not None:
            headers.append((b"retry-after", str(math.ceil(retry_after)).encode()))
            # The OpenAI and Anthropic SDKs prefer this precise header over Retry-After.
            headers.append((b"retry-after-ms", str(int(retry_after * 1000)).encode()))
        body = fault_body(dialect, model, controls, status)
        await send_json(send, status, body, headers)

    def run_batch_line(self, path: str, request: dict[str, Any]) -> tuple[int, bytes]:
        """(status, body) that a live POST of ``request`` to ``path`` would get, for a batch line.

        The same handlers and fault controls as live calls, so a line's usage equals a live
        call's; latency, timeout and stream-shape controls mean nothing offline and are ignored.
        """
        dialect, handler = self.provider_routes[path]
        model = request.get("model")
        if not isinstance(model, str) or not model:
            message = "model: Field required" if dialect == ANTHROPIC else "'model' is required."
            return 400, error_body(dialect, 400, message, "model")
        if request.get("stream"):
            # Neither provider streams inside a batch.
            message = "Streaming is not supported in batch requests; remove 'stream'."
            return 400, error_body(dialect, 400, message, "stream")
        seen = self.batch_by_model[model] = self.batch_by_model.get(model, 0) + 1
        controls = parse_controls(model, [])
        status = fault_status(controls, seen) if controls is not NO_CONTROLS else None
        if status is not None:
            return status, fault_body(dialect, model, controls, status)
        try:
            reply = handler(request, model, controls)
        except BadRequest as exc:
            return 400, error_body(dialect, 400, exc.message, exc.param, exc.code)
        assert isinstance(reply, bytes), "stream was refused above"
        return 200, reply

    # ---- Anthropic cache memory -------------------------------------------------------------

    def remember_prefixes(self, digests: list[bytes]) -> None:
        for digest in digests:
            self.cache_prefixes[digest] = None
            self.cache_prefixes.move_to_end(digest)
        while len(self.cache_prefixes) > MAX_CACHE_PREFIXES:
            self.cache_prefixes.popitem(last=False)

    # ---- OpenAI ------------------------------------------------------------------------------

    def chat_completions(self, request: dict[str, Any], model: str, controls: Controls) -> Reply:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array.", "messages")
        choices = _int_field(request, "n") or 1
        if choices > 128:
            raise BadRequest("'n' must be at most 128.", "n")
        limit = _int_field(request, "max_completion_tokens", "max_tokens")
        stops = _stop_list(request.get("stop"), "stop")
        tools = request.get("tools") if isinstance(request.get("tools"), list) else None
        prompt_tokens = openai_prompt_tokens(messages, tools)
        cached = controls.cached_tokens
        if cached is None:
            cached = (
                prompt_tokens // 2 // 128 * 128 if prompt_tokens >= CACHE_MIN_PROMPT_TOKENS else 0
            )
        reasoning_model = is_reasoning_model(model)
        tool = pick_openai_tool(tools, request.get("tool_choice"), messages)
        if tool is not None:
            parameters = tool.get("parameters") or {"type": "object", "properties": {}}
            arguments = orjson.dumps(fill_schema(parameters)).decode()
            output = plan_output(
                arguments, controls, limit=limit, reasoning_model=reasoning_model, pad_words=False
            )
            finish = "length" if output.finish == "length" else "tool_calls"
        else:
            text, is_json = openai_reply_content(request.get("response_format"), messages)
            output = plan_output(
                text,
                controls,
                limit=limit,
                reasoning_model=reasoning_model,
                stops=stops,
                pad_words=not is_json,
            )
            finish = "length" if output.finish == "length" else "stop"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": output.completion_tokens * choices,
            "total_tokens": prompt_tokens + output.completion_tokens * choices,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": output.reasoning_tokens * choices,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        completion_id = _new_id("chatcmpl-")
        created = int(time.time())
        tool_name = str(tool.get("name", "")) if tool is not None else None
        if request.get("stream"):
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return chat_stream(
                completion_id=completion_id,
                created=created,
                model=model,
                output=output,
                finish=finish,
                choices=choices,
                tool_name=tool_name,
                usage=usage if include_usage and not controls.no_usage else None,
                usage_null=include_usage and not controls.no_usage,
                chunks=controls.chunks,
            )
        message: dict[str, Any]
        if tool_name is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": _new_id("call_"),
                        "type": "function",
                        "function": {"name": tool_name, "arguments": output.text},
                    }
                ],
                "refusal": None,
                "annotations": [],
            }
        else:
            message = {
                "role": "assistant",
                "content": output.text,
                "refusal": None,
                "annotations": [],
            }
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
                for index in range(choices)
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return orjson.dumps(body)

    def completions(self, request: dict[str, Any], model: str, controls: Controls) -> Reply:
        prompts = legacy_prompts(request.get("prompt"))
        choices_per_prompt = _int_field(request, "n") or 1
        if choices_per_prompt * len(prompts) > 128:
            raise BadRequest("'n' times the number of prompts must be at most 128.", "n")
        limit = _int_field(request, "max_tokens")
        stops = _stop_list(request.get("stop"), "stop")
        prompt_tokens = sum(tokens for _, tokens in prompts)
        outputs = [
            plan_output(reply_text(text), controls, limit=limit, stops=stops) for text, _ in prompts
        ]
        completion_tokens = sum(output.completion_tokens for output in outputs) * choices_per_prompt
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        choices = [
            (output, "length" if output.finish == "length" else "stop")
            for output in outputs
            for _ in range(choices_per_prompt)
        ]
        completion_id = _new_id("cmpl-")
        created = int(time.time())
        if request.get("stream"):
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            include_usage = include_usage and not controls.no_usage
            return legacy_stream(
                completion_id, created, model, choices, usage if include_usage else None, controls
            )
        body = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"text": output.text, "index": index, "logprobs": None, "finish_reason": finish}
                for index, (output, finish) in enumerate(choices)
            ],
            "usage": usage,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return orjson.dumps(body)

    def embeddings(self, request: dict[str, Any], model: str, controls: Controls) -> Reply:
        items = embedding_inputs(request.get("input"))
        dimensions = _int_field(request, "dimensions") or EMBEDDING_DIMENSIONS
        if dimensions > 8192:
            raise BadRequest("'dimensions' must be at most 8192.", "dimensions")
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        slot = 0 if encoding == "float" else 1
        data = [
            {"object": "embedding", "index": index, "embedding": embed(key, dimensions)[slot]}
            for index, (key, _) in enumerate(items)
        ]
        prompt_tokens = sum(tokens for _, tokens in items)
        body = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return orjson.dumps(body)

    # ---- OpenAI Responses --------------------------------------------------------------------

    def responses(self, request: dict[str, Any], model: str, controls: Controls) -> Reply:
        items = responses_items(request)
        limit = _int_field(request, "max_output_tokens")
        if limit is not None and limit < RESPONSES_MIN_OUTPUT_TOKENS:
            raise BadRequest(
                "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                f"{RESPONSES_MIN_OUTPUT_TOKENS}, but got {limit} instead.",
                "max_output_tokens",
                "integer_below_min_value",
            )
        tools = request.get("tools") if isinstance(request.get("tools"), list) else None
        instructions = request.get("instructions")
        prompt_tokens = responses_prompt_tokens(instructions, items, tools)
        cached = controls.cached_tokens
        if cached is None:
            cached = (
                prompt_tokens // 2 // 128 * 128 if prompt_tokens >= CACHE_MIN_PROMPT_TOKENS else 0
            )
        reasoning_model = is_reasoning_model(model)
        tool = pick_responses_tool(tools, request.get("tool_choice"), items)
        if tool is not None:
            parameters = tool.get("parameters") or {"type": "object", "properties": {}}
            arguments = orjson.dumps(fill_schema(parameters)).decode()
            output = plan_output(
                arguments, controls, limit=limit, reasoning_model=reasoning_model, pad_words=False
            )
        else:
            text, is_json = responses_reply_content(request.get("text"), items)
            output = plan_output(
                text, controls, limit=limit, reasoning_model=reasoning_model, pad_words=not is_json
            )
        incomplete = output.finish == "length"
        status = "incomplete" if incomplete else "completed"
        item: dict[str, Any]
        if tool is not None:
            item = {
                "id": _new_id("fc_"),
                "type": "function_call",
                "status": status,
                "arguments": output.text,
                "call_id": _new_id("call_"),
                "name": tool["name"],
            }
        else:
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": output.text}
            item = {
                "id": _new_id("msg_"),
                "type": "message",
                "status": status,
                "content": [part],
                "role": "assistant",
            }
        usage = None
        if not controls.no_usage:
            usage = {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": output.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": output.reasoning_tokens},
                "total_tokens": prompt_tokens + output.completion_tokens,
            }
        created = int(time.time())
        reasoning = request.get("reasoning")
        text_config = request.get("text")
        response = {
            "id": _new_id("resp_"),
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "completed_at": None if incomplete else created,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": instructions,
            "max_output_tokens": limit,
            "max_tool_calls": request.get("max_tool_calls"),
            "model": model,
            "output": [item],
            "parallel_tool_calls": _given(request, "parallel_tool_calls", True),
            "previous_response_id": request.get("previous_response_id"),
            "prompt_cache_key": request.get("prompt_cache_key"),
            "reasoning": {
                "effort": "medium" if reasoning_model else None,
                "summary": None,
                **(reasoning if isinstance(reasoning, dict) else {}),
            },
            "safety_identifier": request.get("safety_identifier"),
            "service_tier": "default",
            "store": _given(request, "store", True),
            "temperature": _given(request, "temperature", 1.0),
            "text": {
                "format": {"type": "text"},
                "verbosity": "medium",
                **(text_config if isinstance(text_config, dict) else {}),
            },
            "tool_choice": _given(request, "tool_choice", "auto"),
            "tools": responses_tools_echo(tools),
            "top_logprobs": _given(request, "top_logprobs", 0),
            "top_p": _given(request, "top_p", 1.0),
            "truncation": _given(request, "truncation", "disabled"),
            "usage": usage,
            "user": request.get("user"),
            "metadata": request.get("metadata") or {},
        }
        if request.get("stream"):
            return responses_stream(response, output, controls.chunks)
        return orjson.dumps(response)

    # ---- Anthropic ---------------------------------------------------------------------------

    def messages(self, request: dict[str, Any], model: str, controls: Controls) -> Reply:
        if request.get("max_tokens") is None:
            raise BadRequest("max_tokens: Field required", "max_tokens")
        limit = _int_field(request, "max_tokens")
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: at least one message is required", "messages")
        stops = _stop_list(request.get("stop_sequences"), "stop_sequences")
        total, read, created, created_1h = self.anthropic_input(request, model, register=True)
        if controls.cached_tokens is not None:
            read, created, created_1h = controls.cached_tokens, 0, 0
        tool = pick_anthropic_tool(request.get("tools"), request.get("tool_choice"), messages)
        block: dict[str, Any]
        if tool is not None:
            schema = tool.get("input_schema") or {"type": "object", "properties": {}}
            tool_input = fill_schema(schema)
            arguments = orjson.dumps(tool_input).decode()
            output_tokens = controls.output_tokens
            if output_tokens is None:
                output_tokens = count_tokens(arguments)
            block = {
                "type": "tool_use",
                "id": _new_id("toolu_"),
                "name": str(tool.get("name", "")),
                "input": tool_input,
            }
            output = Output(arguments, "tool_use", None, output_tokens, 0)
        else:
            text = reply_text(last_user_text(messages))
            output = plan_output(text, controls, limit=limit, stops=stops)
            block = {"type": "text", "text": output.text}
        stop_reason = {"stop": "end_turn", "length": "max_tokens"}.get(output.finish, output.finish)
        usage = {
            "input_tokens": max(total - read - created, 0),
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": created - created_1h,
                "ephemeral_1h_input_tokens": created_1h,
            },
            "output_tokens": output.completion_tokens,
            "service_tier": "standard",
        }
        message_id = _new_id("msg_")
        if request.get("stream"):
            return anthropic_stream(
                message_id, model, block, output, stop_reason, usage, controls.chunks
            )
        body = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": stop_reason,
            "stop_sequence": output.stop_sequence,
            "usage": usage,
        }
        return orjson.dumps(body)

    def count_tokens(self, request: dict[str, Any], model: str, controls: Controls) -> Reply:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: at least one message is required", "messages")
        total, _, _, _ = self.anthropic_input(request, model, register=False)
        return orjson.dumps({"input_tokens": total})

    def anthropic_input(
        self, request: dict[str, Any], model: str, *, register: bool
    ) -> tuple[int, int, int, int]:
        """(total input tokens, cache read, cache created, of which created with a 1h TTL)."""
        segments = anthropic_segments(request)
        total = sum(segment[0] for segment in segments)
        if not any(segment[3] is not None for segment in segments):
            return total, 0, 0, 0
        # Cache keys ignore the cache_control markers themselves: moving the breakpoint to the
        # newest turn must still hit the prefix cached by the previous turn.
        running = hashlib.blake2b(base_model(model).encode(), digest_size=16)
        boundaries: list[tuple[bytes, int]] = []
        breakpoints: list[int] = []
        cumulative = 0
        last_ttl = None
        for tokens, prefix, item, marker in segments:
            if isinstance(item, dict) and "cache_control" in item:
                item = {key: value for key, value in item.items() if key != "cache_control"}
            running.update(prefix)
            running.update(orjson.dumps(item))
            cumulative += tokens
            boundaries.append((running.copy().digest(), cumulative))
            if marker is not None:
                breakpoints.append(len(boundaries) - 1)
                last_ttl = marker.get("ttl") if isinstance(marker, dict) else None
        read = 0
        for breakpoint_index in reversed(breakpoints):
            for index in range(
                breakpoint_index, max(breakpoint_index - CACHE_LOOKBACK_BLOCKS, -1), -1
            ):
                if boundaries[index][0] in self.cache_prefixes:
                    read = boundaries[index][1]
                    break
            if read:
                break
        cached_prefix = boundaries[breakpoints[-1]][1]
        created = cached_prefix - read
        if register:
            self.remember_prefixes([boundaries[index][0] for index in breakpoints])
        return total, read, created, created if last_ttl == "1h" else 0


# --------------------------------------------------------------------------------------------
# Request helpers


def openai_prompt_tokens(messages: list[Any], tools: list[Any] | None) -> int:
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("Each message must be an object with 'role'.", "messages")
        total += MESSAGE_OVERHEAD_TOKENS + content_tokens(message.get("content"))
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    total += count_tokens(str(function.get("name", "")))
                    total += count_tokens(str(function.get("arguments", "")))
    if tools:
        total += _json_tokens(tools)
    return total


def pick_openai_tool(
    tools: list[Any] | None, choice: Any, messages: list[Any]
) -> dict[str, Any] | None:
    if not tools or choice == "none":
        return None
    functions: list[dict[str, Any]] = [
        tool["function"]
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    ]
    if not functions:
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        for function in functions:
            if function.get("name") == wanted:
                return function
        raise BadRequest(f"tool_choice names '{wanted}', which is not in 'tools'.", "tool_choice")
    last = messages[-1]
    if choice != "required" and isinstance(last, dict) and last.get("role") == "tool":
        return None
    return functions[0]


def openai_reply_content(response_format: Any, messages: list[Any]) -> tuple[str, bool]:
    """The reply text and whether it is JSON (JSON is padded with spaces, never words)."""
    text = reply_text(last_user_text(messages))
    if not isinstance(response_format, dict):
        return text, False
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return orjson.dumps(fill_schema(schema or {"type": "object"})).decode(), True
    if kind == "json_object":
        return orjson.dumps({"reply": text}).decode(), True
    return text, False


def legacy_prompts(prompt: Any) -> list[tuple[str, int]]:
    """(text the reply quotes, prompt tokens) per prompt of a legacy completion request."""
    if isinstance(prompt, str):
        return [(prompt, count_tokens(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, int) for item in prompt):
            return [(f"{len(prompt)} tokens", len(prompt))]
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append((item, count_tokens(item)))
            elif isinstance(item, list) and all(isinstance(token, int) for token in item):
                prompts.append((f"{len(item)} tokens", len(item)))
            else:
                break
        else:
            return prompts
    raise BadRequest("'prompt' must be a string, an array of strings or token arrays.", "prompt")


def embedding_inputs(value: Any) -> list[tuple[bytes, int]]:
    """(hash key, tokens) per embedding input."""
    if isinstance(value, str):
        return [(b"s" + value.encode(), count_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return [(b"t" + orjson.dumps(value), len(value))]
        items = []
        for item in value:
            if isinstance(item, str):
                items.append((b"s" + item.encode(), count_tokens(item)))
            elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
                items.append((b"t" + orjson.dumps(item), len(item)))
            else:
                break
        else:
            return items
    raise BadRequest(
        "'input' must be a non-empty string, array of strings or array of token arrays.", "input"
    )


def anthropic_segments(request: dict[str, Any]) -> list[tuple[int, bytes, Any, Any]]:
    """(tokens, hash prefix, item, cache_control) per cacheable unit, in cache-prefix order."""
    segments: list[tuple[int, bytes, Any, Any]] = []
    tools = request.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                segments.append((_json_tokens(tool), b"T", tool, tool.get("cache_control")))
    system = request.get("system")
    if isinstance(system, str):
        segments.append((count_tokens(system), b"S", system, None))
    elif isinstance(system, list):
        for block in system:
            if isinstance(block, dict):
                tokens = content_tokens([block])
                segments.append((tokens, b"S", block, block.get("cache_control")))
    for message in request.get("messages") or ():
        if not isinstance(message, dict):
            raise BadRequest("messages: each message must be an object", "messages")
        role = str(message.get("role", "")).encode()
        content = message.get("content")
        if isinstance(content, list) and content:
            for index, block in enumerate(content):
                tokens = content_tokens([block])
                marker = block.get("cache_control") if isinstance(block, dict) else None
                if index == 0:
                    segments.append((tokens + MESSAGE_OVERHEAD_TOKENS, role, block, marker))
                else:
                    segments.append((tokens, b"", block, marker))
        else:
            tokens = MESSAGE_OVERHEAD_TOKENS + content_tokens(content)
            segments.append((tokens, role, content, None))
    return segments


def pick_anthropic_tool(tools: Any, choice: Any, messages: list[Any]) -> dict[str, Any] | None:
    if not isinstance(tools, list):
        return None
    # Server tools (web search and friends) have no input_schema; the mock only calls custom ones.
    custom = [tool for tool in tools if isinstance(tool, dict) and "input_schema" in tool]
    kind = choice.get("type") if isinstance(choice, dict) else "auto"
    if not custom or kind == "none":
        return None
    if kind == "tool":
        wanted = choice.get("name") if isinstance(choice, dict) else None
        for tool in custom:
            if tool.get("name") == wanted:
                return tool
        raise BadRequest(f"tool_choice.name '{wanted}' is not one of the tools", "tool_choice")
    if kind != "any" and _ends_with_tool_result(messages):
        return None
    return custom[0]


def _ends_with_tool_result(messages: list[Any]) -> bool:
    last = messages[-1]
    if not isinstance(last, dict) or not isinstance(last.get("content"), list):
        return False
    return any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in last["content"]
    )


def responses_items(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``input`` of a Responses request as a list of items (a string is one user message)."""
    value = request.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string or a non-empty array of input items.", "input")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise BadRequest(
                f"Invalid type for 'input[{index}]': expected an object.", "input", "invalid_type"
            )
        if item.get("type", "message") == "message" and "role" not in item:
            raise BadRequest(
                f"Missing required parameter: 'input[{index}].role'.",
                f"input[{index}].role",
                "missing_required_parameter",
            )
    return value


def responses_prompt_tokens(
    instructions: Any, items: list[dict[str, Any]], tools: list[Any] | None
) -> int:
    total = 0
    if isinstance(instructions, str) and instructions:
        total += MESSAGE_OVERHEAD_TOKENS + count_tokens(instructions)
    elif isinstance(instructions, list):
        items = [item for item in instructions if isinstance(item, dict)] + items
    for item in items:
        kind = item.get("type", "message")
        total += MESSAGE_OVERHEAD_TOKENS
        if kind == "function_call":
            total += count_tokens(str(item.get("name", "")))
            total += count_tokens(str(item.get("arguments", "")))
        elif kind == "function_call_output":
            total += content_tokens(item.get("output"))
        elif kind == "reasoning":
            total += content_tokens(item.get("summary"))
        else:
            total += content_tokens(item.get("content"))
    if tools:
        total += _json_tokens(tools)
    return total


def responses_prompt_text(items: list[dict[str, Any]]) -> str:
    for item in reversed(items):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return content_text(item.get("content"))
    last = items[-1]
    if last.get("type") == "function_call_output":
        return content_text(last.get("output"))
    return content_text(last.get("content"))


def _after_function_output(items: list[dict[str, Any]]) -> bool:
    """Whether the latest turn returns tool output: a function_call_output, possibly followed
    by user text (an Anthropic user turn of tool_result plus text, as litellm translates it)."""
    for item in reversed(items):
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in ("user", "system", "developer"):
            continue
        return bool(kind == "function_call_output")
    return False


def pick_responses_tool(
    tools: list[Any] | None, choice: Any, items: list[dict[str, Any]]
) -> dict[str, Any] | None:
    if not tools:
        return None
    functions = []
    for index, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "function":
            if not isinstance(tool.get("name"), str):
                # Chat-style {"type": "function", "function": {...}} tools land here, as upstream.
                raise BadRequest(
                    f"Missing required parameter: 'tools[{index}].name'.",
                    f"tools[{index}].name",
                    "missing_required_parameter",
                )
            functions.append(tool)
    if not functions or choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        wanted = choice.get("name")
        for function in functions:
            if function["name"] == wanted:
                return function
        raise BadRequest(f"Tool choice '{wanted}' not found in 'tools' parameter.", "tool_choice")
    if choice != "required" and _after_function_output(items):
        return None
    return functions[0]


def responses_tools_echo(tools: list[Any] | None) -> list[Any]:
    """Tools as the Responses API echoes them: function tools are strict unless told not."""
    if not tools:
        return []
    echoed = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            strict = tool.get("strict")
            tool = {"type": "function", "description": None, **tool}
            tool["strict"] = True if strict is None else strict
        echoed.append(tool)
    return echoed


def responses_reply_content(text_config: Any, items: list[dict[str, Any]]) -> tuple[str, bool]:
    """Like openai_reply_content, for the Responses ``text.format`` (its schema sits inline)."""
    fmt = text_config.get("format") if isinstance(text_config, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
    return openai_reply_content(fmt, [{"role": "user", "content": responses_prompt_text(items)}])


# --------------------------------------------------------------------------------------------
# Streams


def chat_stream(
    *,
    completion_id: str,
    created: int,
    model: str,
    output: Output,
    finish: str,
    choices: int,
    tool_name: str | None,
    usage: dict[str, Any] | None,
    usage_null: bool,
    chunks: int,
) -> Stream:
    # Frames are spliced from byte templates: only the varying piece goes through orjson.
    head = (
        b'data: {"id":'
        + orjson.dumps(completion_id)
        + b',"object":"chat.completion.chunk","created":'
        + str(created).encode()
        + b',"model":'
        + orjson.dumps(model)
        + b',"service_tier":"default","system_fingerprint":"'
        + SYSTEM_FINGERPRINT.encode()
        + b'","choices":['
    )
    tail = b'],"usage":null}\n\n' if usage_null else b"]}\n\n"
    stream = Stream()
    frames = stream.frames
    pieces = [orjson.dumps(piece) for piece in split_text(output.text, chunks)]
    if tool_name is None:
        for index in range(choices):
            opening = (
                b'{"index":%d,"delta":{"role":"assistant","content":"","refusal":null},'
                b'"logprobs":null,"finish_reason":null}' % index
            )
            frames.append((head + opening + tail, False))
        for piece in pieces:
            for index in range(choices):
                content = b'{"index":%d,"delta":{"content":' % index + piece
                frames.append(
                    (head + content + b'},"logprobs":null,"finish_reason":null}' + tail, True)
                )
    else:
        for index in range(choices):
            call = {
                "index": 0,
                "id": _new_id("call_"),
                "type": "function",
                "function": {"name": tool_name, "arguments": ""},
            }
            delta = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            frames.append((head + orjson.dumps(choice) + tail, False))
        for piece in pieces:
            for index in range(choices):
                delta_bytes = (
                    b'{"index":%d,"delta":{"tool_calls":[{"index":0,"function":{"arguments":'
                    % index
                    + piece
                    + b'}}]},"logprobs":null,"finish_reason":null}'
                )
                frames.append((head + delta_bytes + tail, True))
    for index in range(choices):
        closing = b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%s"}' % (
            index,
            finish.encode(),
        )
        frames.append((head + closing + tail, False))
    if usage is not None:
        frames.append((head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n", False))
    frames.append((_DONE, False))
    return stream


def legacy_stream(
    completion_id: str,
    created: int,
    model: str,
    choices: list[tuple[Output, str]],
    usage: dict[str, Any] | None,
    controls: Controls,
) -> Stream:
    stream = Stream()
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "choices": [],
        "model": model,
    }
    if usage is not None:
        base["usage"] = None

    def frame(choice_list: list[dict[str, Any]], usage_value: Any = None) -> bytes:
        body = {**base, "choices": choice_list}
        if usage_value is not None:
            body["usage"] = usage_value
        return b"data: " + orjson.dumps(body) + b"\n\n"

    split = [split_text(output.text, controls.chunks) for output, _ in choices]
    for step in range(max((len(pieces) for pieces in split), default=0)):
        for index, pieces in enumerate(split):
            if step < len(pieces):
                choice = {"text": pieces[step], "index": index, "logprobs": None}
                stream.frames.append((frame([{**choice, "finish_reason": None}]), True))
    for index, (_, finish) in enumerate(choices):
        choice = {"text": "", "index": index, "logprobs": None, "finish_reason": finish}
        stream.frames.append((frame([choice]), False))
    if usage is not None:
        stream.frames.append((frame([], usage), False))
    stream.frames.append((_DONE, False))
    return stream


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_stream(
    message_id: str,
    model: str,
    block: dict[str, Any],
    output: Output,
    stop_reason: str,
    usage: dict[str, Any],
    chunks: int,
) -> Stream:
    stream = Stream()
    frames = stream.frames
    start_usage = {**usage, "output_tokens": 1}
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    frames.append((_event("message_start", {"type": "message_start", "message": message}), False))
    if block["type"] == "tool_use":
        opening = {**block, "input": {}}
        prefix = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        prefix += b'"delta":{"type":"input_json_delta","partial_json":'
    else:
        opening = {"type": "text", "text": ""}
        prefix = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        prefix += b'"delta":{"type":"text_delta","text":'
    start = {"type": "content_block_start", "index": 0, "content_block": opening}
    frames.append((_event("content_block_start", start), False))
    frames.append((b'event: ping\ndata: {"type":"ping"}\n\n', False))
    for piece in split_text(output.text, chunks):
        frames.append((prefix + orjson.dumps(piece) + b"}}\n\n", True))
    stop = {"type": "content_block_stop", "index": 0}
    frames.append((_event("content_block_stop", stop), False))
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": output.stop_sequence},
        "usage": {"output_tokens": output.completion_tokens},
    }
    frames.append((_event("message_delta", delta), False))
    frames.append((_event("message_stop", {"type": "message_stop"}), False))
    return stream


def responses_stream(response: dict[str, Any], output: Output, chunks: int) -> Stream:
    """OpenAI's Responses event sequence for a finished ``response`` with one output item."""
    stream = Stream()
    frames = stream.frames
    sequence = 0

    def emit(kind: str, data: dict[str, Any]) -> None:
        nonlocal sequence
        frames.append((_event(kind, {"type": kind, "sequence_number": sequence, **data}), False))
        sequence += 1

    opening = {
        **response,
        "status": "in_progress",
        "completed_at": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }
    emit("response.created", {"response": opening})
    emit("response.in_progress", {"response": opening})
    item = response["output"][0]
    item_id = item["id"]
    where = {"item_id": item_id, "output_index": 0}
    pieces = split_text(output.text, chunks)
    if item["type"] == "function_call":
        emit(
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "arguments": ""}},
        )
        kind = b"response.function_call_arguments.delta"
        suffix = b"}\n\n"
    else:
        emit(
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        )
        part = item["content"][0]
        emit(
            "response.content_part.added",
            {**where, "content_index": 0, "part": {**part, "text": ""}},
        )
        kind = b"response.output_text.delta"
        suffix = b',"logprobs":[]}\n\n'
        where = {**where, "content_index": 0}
    # Deltas are spliced from byte templates: only the sequence number and the piece vary.
    prefix = b"event: " + kind + b'\ndata: {"type":"' + kind + b'","sequence_number":'
    middle = b"," + orjson.dumps(where)[1:-1] + b',"delta":'
    for piece in pieces:
        frames.append(
            (prefix + str(sequence).encode() + middle + orjson.dumps(piece) + suffix, True)
        )
        sequence += 1
    if item["type"] == "function_call":
        done = {**where, "name": item["name"], "arguments": item["arguments"]}
        emit("response.function_call_arguments.done", done)
    else:
        emit("response.output_text.done", {**where, "text": part["text"], "logprobs": []})
        emit("response.content_part.done", {**where, "part": part})
    emit("response.output_item.done", {"output_index": 0, "item": item})
    final = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    emit(final, {"response": response})
    return stream


def fault_body(dialect: str, model: str, controls: Controls, status: int) -> bytes:
    """The error body of an injected fault, live or on a batch line."""
    if status == 429:
        message = f"Rate limit reached for {model} (mock upstream status control)."
    elif status == 529:
        message = "Overloaded (mock upstream status control)."
    elif controls.error_code in _CODED_ERRORS:
        message = _CODED_ERRORS[controls.error_code]
    else:
        message = f"Mock upstream injected HTTP {status} for {model}."
    return error_body(dialect, status, message, code=controls.error_code)


def fault_status(controls: Controls, seen: int) -> int | None:
    """The error status to inject for the ``seen``-th request of this model string, if any."""
    if controls.fail_first is not None and seen <= controls.fail_first:
        return controls.status or 503
    rate = controls.fail_rate
    if rate is not None:
        # Fail when n*rate crosses an integer: exactly floor(n*rate) of the first n requests.
        if math.floor(seen * rate) > math.floor((seen - 1) * rate):
            return controls.status or 500
        return None
    if controls.fail_first is not None:
        return None
    return controls.status


app = MockUpstream()
