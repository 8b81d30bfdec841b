"""Calling a provider, on one of two paths that answer identically.

- Upstreams that already speak OpenAI's dialect get the request body forwarded
  over a pooled HTTP client and their response bytes passed back untouched: no
  re-validation, no per-chunk re-serialisation. Usage is read from the JSON body
  or from the final SSE chunk.
- Every other provider goes through litellm, which translates the dialect; its
  objects are serialised once into the same OpenAI shape.

Both raise `UpstreamError` with the provider's status, so retries, fallbacks and
error mapping above this module never need to know which path ran.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import litellm
import orjson

from gateway.routing import Deployment

# Providers whose HTTP API is OpenAI's own shape, so bytes can pass straight through.
PASSTHROUGH_PROVIDERS = frozenset({"openai", "hosted_vllm", "openai_like", "lm_studio"})
OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
ANTHROPIC_DEFAULT_BASE = "https://api.anthropic.com"

_SECRETISH = re.compile(
    r"(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+|key[=:]\s*\S+|https?://\S+|\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b)",
    re.IGNORECASE,
)


def sanitise(message: str, limit: int = 400) -> str:
    """A provider's error message, minus credentials, URLs and addresses."""
    cleaned = _SECRETISH.sub("[redacted]", message or "").strip()
    return cleaned[:limit] if cleaned else "The provider returned an error."


@dataclass
class UpstreamError(Exception):
    """A provider call that failed. `status` is the provider's (or 599 for no answer)."""

    status: int
    message: str
    kind: str = "http"  # http | timeout | connection
    retry_after: float | None = None
    param: str | None = None
    provider_code: str | None = None
    # True when the provider may have generated (and billed) tokens before failing.
    partial: bool = False

    def __str__(self) -> str:
        return f"{self.status} {self.kind}: {self.message}"


@dataclass
class JsonAnswer:
    body: bytes
    data: dict[str, Any]


@dataclass
class StreamHandle:
    """SSE events from the provider, each a complete `data: …\\n\\n` frame."""

    events: AsyncIterator[bytes]
    close: Any = field(default=None)


# --- the pooled HTTP client ---------------------------------------------------------
#
# aiohttp rather than httpx: on the pass-through path the HTTP client is most of the
# gateway's own CPU per request, and aiohttp's C-accelerated parser costs a fraction
# of httpx's (measured with py-spy under `make bench`).

_sessions: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}


def _session() -> aiohttp.ClientSession:
    # One pool per event loop: a session must not be shared across loops (and an id
    # may be reused by a later loop, so the loop itself is compared too).
    loop = asyncio.get_running_loop()
    entry = _sessions.get(id(loop))
    if entry is None or entry[0] is not loop or entry[1].closed:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30),
            # The body is forwarded as is; no cookies, no proxies from the environment.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=True,
        )
        entry = (loop, session)
        _sessions[id(loop)] = entry
    return entry[1]


async def close_sessions() -> None:
    """Close this event loop's pool (at lifespan shutdown): sockets closed in order,
    and no "Unclosed client session" warnings when a worker exits."""
    entry = _sessions.pop(id(asyncio.get_running_loop()), None)
    if entry is not None and not entry[1].closed:
        await entry[1].close()


def _timeout(deployment: Deployment) -> aiohttp.ClientTimeout:
    # No total: a long stream is fine as long as bytes keep coming.
    return aiohttp.ClientTimeout(
        total=None,
        sock_connect=min(10.0, deployment.timeout_seconds),
        sock_read=deployment.timeout_seconds,
    )


def openai_target(deployment: Deployment, path: str) -> tuple[str, dict[str, str]]:
    """URL and headers for an OpenAI-dialect provider endpoint such as 'chat/completions'."""
    base = (deployment.api_base or OPENAI_DEFAULT_BASE).rstrip("/")
    headers = {"content-type": "application/json"}
    if deployment.api_key:
        headers["authorization"] = f"Bearer {deployment.api_key}"
    return f"{base}/{path}", headers


def anthropic_target(
    deployment: Deployment, client_headers: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """URL and headers for Anthropic's /v1/messages; version and beta flags come from the client."""
    base = (deployment.api_base or ANTHROPIC_DEFAULT_BASE).rstrip("/")
    url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
    headers = {
        "content-type": "application/json",
        "anthropic-version": client_headers.get("anthropic-version") or "2023-06-01",
    }
    if client_headers.get("anthropic-beta"):
        headers["anthropic-beta"] = client_headers["anthropic-beta"]
    if deployment.api_key:
        headers["x-api-key"] = deployment.api_key
    return url, headers


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    raw = headers.get("retry-after-ms")
    if raw:
        try:
            return max(0.0, float(raw) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            return None
    return None


def _error_from_body(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    message, param, code = "", None, None
    try:
        data = orjson.loads(body)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            param = error.get("param") if isinstance(error.get("param"), str) else None
            code = str(error.get("code")) if error.get("code") is not None else None
        elif isinstance(error, str):
            message = error
    except orjson.JSONDecodeError:
        message = body[:200].decode("utf-8", "replace")
    return UpstreamError(
        status=status,
        message=sanitise(message),
        retry_after=_retry_after(headers),
        param=param,
        provider_code=code,
    )


def _transport_error(exc: BaseException, *, partial: bool = False) -> UpstreamError:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamError(
            504, "The provider did not answer in time.", "timeout", partial=partial
        )
    return UpstreamError(
        502, "The connection to the provider failed or was cut off.", "connection", partial=partial
    )


_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


def passthrough_payload(deployment: Deployment, body: dict[str, Any]) -> dict[str, Any]:
    payload = dict(body)
    payload["model"] = deployment.upstream_model
    return payload


async def passthrough_json(
    target: tuple[str, dict[str, str]], deployment: Deployment, payload: dict[str, Any]
) -> JsonAnswer:
    url, headers = target
    try:
        async with _session().post(
            url,
            data=orjson.dumps(payload),
            headers={**headers, "accept": "application/json"},
            timeout=_timeout(deployment),
            # Never follow redirects: a provider answering 30x must not be able to
            # bounce the gateway (and its credentials) to another host.
            allow_redirects=False,
        ) as response:
            body = await response.read()
            status, response_headers = response.status, response.headers
    except _TRANSPORT_ERRORS as exc:
        raise _transport_error(exc) from exc
    if status >= 300:
        raise _error_from_body(status if status >= 400 else 502, body, response_headers)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(502, "The provider answered with malformed JSON.") from exc
    if not isinstance(data, dict):
        raise UpstreamError(502, "The provider answered with an unexpected JSON shape.")
    return JsonAnswer(body=body, data=data)


async def sse_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-cut a byte stream into whole SSE events (`…\n\n`), whatever its chunking."""
    buffer = b""
    async for piece in chunks:
        buffer += piece
        if b"\r\n" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        while True:
            cut = buffer.find(b"\n\n")
            if cut < 0:
                break
            event, buffer = buffer[: cut + 2], buffer[cut + 2 :]
            if event.strip():
                yield event
    if buffer.strip():
        yield buffer.rstrip(b"\n") + b"\n\n"


async def passthrough_stream(
    target: tuple[str, dict[str, str]], deployment: Deployment, payload: dict[str, Any]
) -> StreamHandle:
    url, headers = target
    try:
        response = await _session().post(
            url,
            data=orjson.dumps(payload),
            headers={**headers, "accept": "text/event-stream"},
            timeout=_timeout(deployment),
            allow_redirects=False,
        )
    except _TRANSPORT_ERRORS as exc:
        raise _transport_error(exc) from exc
    if response.status >= 300:
        try:
            body = await response.read()
        except _TRANSPORT_ERRORS:
            body = b""
        response.release()
        raise _error_from_body(
            response.status if response.status >= 400 else 502, body, response.headers
        )

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for piece in response.content.iter_any():
                yield piece
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, partial=True) from exc
        finally:
            response.release()

    async def close() -> None:
        response.close()

    return StreamHandle(events=sse_frames(chunks()), close=close)


# --- the litellm path ------------------------------------------------------------------


def litellm_kwargs(deployment: Deployment) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": deployment.provider_model,
        "timeout": deployment.timeout_seconds,
        "drop_params": deployment.drop_unsupported_params,
        "max_retries": 0,
        "num_retries": 0,
    }
    if deployment.api_base:
        kwargs["api_base"] = deployment.api_base
    # Always pass a key: with none, litellm would fall back to the gateway process's
    # own environment (ANTHROPIC_API_KEY…), which must never leak into a deployment.
    kwargs["api_key"] = deployment.api_key or "no-key"
    if deployment.api_version:
        kwargs["api_version"] = deployment.api_version
    return kwargs


_UNSUPPORTED = re.compile(r"does not support parameters:\s*\[([^\]]*)\]")


def from_litellm(exc: Exception, *, partial: bool = False) -> UpstreamError:
    if isinstance(exc, ValueError | TypeError | KeyError) and not hasattr(exc, "status_code"):
        # Raised while litellm translated the request, before any provider was
        # called: the request cannot be expressed for this model. The client's to fix.
        return UpstreamError(
            400,
            sanitise(f"The request cannot be translated for this model: {exc}"),
            provider_code="untranslatable_request",
        )
    status = int(getattr(exc, "status_code", 0) or 0)
    message = str(getattr(exc, "message", "") or exc)
    if (
        isinstance(exc, litellm.UnsupportedParamsError)
        or "UnsupportedParamsError" in type(exc).__name__
    ):
        match = _UNSUPPORTED.search(message)
        names = [n.strip(" '\"") for n in match.group(1).split(",")] if match else []
        listed = ", ".join(repr(n) for n in names) or "some parameters"
        return UpstreamError(
            400,
            f"This model does not support {listed}; remove them, or ask an admin to enable "
            "dropping unsupported parameters for this model.",
            param=names[0] if names else None,
            provider_code="unsupported_parameter",
        )
    if isinstance(exc, litellm.Timeout) or status == 408:
        return UpstreamError(
            504, "The provider did not answer in time.", "timeout", partial=partial
        )
    if isinstance(exc, litellm.APIConnectionError) and status in (0, 500):
        return UpstreamError(
            502, "The connection to the provider failed.", "connection", partial=partial
        )
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    clean = re.sub(r"^litellm\.\w+:\s*(\w+Exception -\s*)?", "", message)
    return UpstreamError(
        status or 502,
        sanitise(clean),
        retry_after=_retry_after(headers) if headers is not None else None,
        partial=partial,
    )


def _dump(obj: Any) -> dict[str, Any]:
    # mode="json": enums (litellm's event types) become their plain string values.
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else dict(obj)
    # litellm-internal bookkeeping that no OpenAI client expects.
    for private in ("_hidden_params", "_response_ms"):
        data.pop(private, None)
    return data


async def litellm_json(call: Any, deployment: Deployment, body: dict[str, Any]) -> JsonAnswer:
    """Run a litellm call (acompletion, aembedding, aresponses…) and serialise its result once."""
    try:
        result = await call(**{**body, **litellm_kwargs(deployment)})
    except Exception as exc:
        raise from_litellm(exc) from exc
    data = result if isinstance(result, dict) else _dump(result)
    return JsonAnswer(body=orjson.dumps(data), data=data)


def openai_chunk(chunk: Any) -> bytes:
    return b"data: " + orjson.dumps(_dump(chunk)) + b"\n\n"


def typed_event(event: Any) -> bytes:
    """A Responses-API style event: `event: <type>` plus its JSON."""
    data = _dump(event)
    return (
        b"event: "
        + str(data.get("type", "message")).encode()
        + b"\ndata: "
        + orjson.dumps(data)
        + b"\n\n"
    )


async def litellm_stream(
    call: Any, deployment: Deployment, body: dict[str, Any], frame: Any, done: bytes = b""
) -> StreamHandle:
    """Run a streaming litellm call; `frame` turns each item into SSE bytes (None: raw bytes)."""
    try:
        stream = await call(**{**body, **litellm_kwargs(deployment), "stream": True})
    except Exception as exc:
        raise from_litellm(exc) from exc

    async def items() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                yield item if frame is None else frame(item)
        except Exception as exc:
            raise from_litellm(exc, partial=True) from exc
        if done:
            yield done

    return StreamHandle(events=sse_frames(items()) if frame is None else items(), close=None)


def is_passthrough(deployment: Deployment) -> bool:
    return deployment.provider in PASSTHROUGH_PROVIDERS


def session() -> aiohttp.ClientSession:
    """This event loop's pooled client, for provider calls outside a request (native
    batches); callers pass allow_redirects=False like every call here."""
    return _session()
