"""What differs between the endpoints the gateway serves.

Chat completions, legacy completions, embeddings, the Responses API and
Anthropic's Messages API share one flow (gateway.flow). Each `Endpoint` here
says how to validate its body, count its prompt, find its usage (in a JSON body
or in a stream's events), call a provider on the pass-through or the litellm
path, and report an error inside a stream in its own dialect.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import litellm
import orjson
from litellm.anthropic_interface import messages as anthropic_messages

from billing.pricing import Usage
from core.errors import GatewayError
from gateway import upstream, validation
from gateway.routing import Deployment

_USAGE = re.compile(rb'"usage"\s*:\s*\{')


# --- usage ----------------------------------------------------------------------------------


def openai_usage(data: Any) -> Usage | None:
    """Usage in OpenAI's convention (chat, completions, embeddings, Responses API)."""
    if not isinstance(data, dict):
        return None
    prompt = int(data.get("prompt_tokens") or data.get("input_tokens") or 0)
    completion = int(data.get("completion_tokens") or data.get("output_tokens") or 0)
    prompt_details = data.get("prompt_tokens_details") or data.get("input_tokens_details") or {}
    completion_details = (
        data.get("completion_tokens_details") or data.get("output_tokens_details") or {}
    )
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_read_tokens=int(
            prompt_details.get("cached_tokens") or data.get("cache_read_input_tokens") or 0
        ),
        # litellm reports an Anthropic model's cache writes here, inside prompt_tokens.
        cache_write_tokens=int(data.get("cache_creation_input_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def anthropic_usage(data: Any) -> Usage | None:
    """Anthropic's usage, whose input_tokens exclude both cache kinds, in OpenAI's convention."""
    if not isinstance(data, dict):
        return None
    reads = int(data.get("cache_read_input_tokens") or 0)
    writes = int(data.get("cache_creation_input_tokens") or 0)
    return Usage(
        prompt_tokens=int(data.get("input_tokens") or 0) + reads + writes,
        completion_tokens=int(data.get("output_tokens") or 0),
        cached_read_tokens=reads,
        cache_write_tokens=writes,
    )


# --- counting -----------------------------------------------------------------------------

_SKIP_KEYS = frozenset(
    {"type", "role", "id", "call_id", "tool_call_id", "tool_use_id", "cache_control"}
)


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, child in value.items():
            if key not in _SKIP_KEYS:
                _strings(child, out)
    elif isinstance(value, list):
        for child in value:
            _strings(child, out)


def text_bytes(body: dict[str, Any], fields: tuple[str, ...]) -> int:
    """UTF-8 bytes of the prompt's text: no tokenizer makes more tokens than bytes.

    Inline media (data: URLs) are left out; their token cost comes from the counter.
    """
    parts: list[str] = []
    for name in fields:
        _strings(body.get(name), parts)
    return sum(len(p.encode()) for p in parts if not p.startswith("data:"))


def count_text(model: str, text: str) -> int:
    if not text:
        return 0
    try:
        return int(litellm.token_counter(model=model, text=text))
    except Exception:
        return max(1, len(text.encode()) // 2)


def _count_fields(*names: str) -> Callable[[str, dict[str, Any]], int]:
    def count(model: str, body: dict[str, Any]) -> int:
        parts: list[str] = []
        for name in names:
            _strings(body.get(name), parts)
        # A few tokens per message/block of framing the text alone does not show.
        return count_text(model, "\n".join(parts)) + 4 * len(parts)

    return count


def count_chat(model: str, body: dict[str, Any]) -> int:
    try:
        return int(
            litellm.token_counter(
                model=model,
                messages=body["messages"],
                tools=body.get("tools"),
                # Never fetch an image URL just to count its tokens.
                use_default_image_token_count=True,
            )
        )
    except Exception:
        return _count_fields("messages", "tools")(model, body)


def count_embedding_input(model: str, body: dict[str, Any]) -> int:
    value = body.get("input")
    items = value if isinstance(value, list) else [value]
    total = 0
    for item in items:
        if isinstance(item, str):
            total += count_text(model, item)
        elif isinstance(item, list):  # already tokens (or a batch of token arrays)
            total += sum(len(x) if isinstance(x, list) else 1 for x in item)
    return total


# --- the text a stream carried, for counting when a provider reports no usage -------------

_TEXT_KEYS = ("content", "delta", "text", "partial_json", "arguments", "name")


def _generated(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        for key, child in value.items():
            if key in _TEXT_KEYS and isinstance(child, str):
                out.append(child)
            elif key != "usage":
                _generated(child, out)
    elif isinstance(value, list):
        for child in value:
            _generated(child, out)


def stream_text(events: list[bytes]) -> str:
    parts: list[str] = []
    for event in events:
        # Named events (Responses, Anthropic) repeat the whole text in their
        # "done"/"stop" events; only the deltas are the generated text, once.
        if event.startswith(b"event: ") and b"delta" not in event.split(b"\n", 1)[0]:
            continue
        for line in event.split(b"\n"):
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                try:
                    _generated(orjson.loads(line[6:]), parts)
                except orjson.JSONDecodeError:
                    continue
    return "".join(parts)


# --- stream trackers ---------------------------------------------------------------------------


@dataclass
class Tracker:
    """Reads a provider's stream as it passes: usage, the end marker, provider errors.

    `feed` returns the bytes to forward now (None to hold or drop). The end marker
    is held back and sent by `finish` only after the ledger row is written.
    """

    client_wants_usage: bool = True
    usage: Usage | None = None
    ended: bool = False
    provider_error: str | None = None
    held: list[bytes] = field(default_factory=list)
    # The final answer object, where a later request may refer to it by id (Responses).
    answer: dict[str, Any] | None = None

    def feed(self, event: bytes) -> bytes | None:
        raise NotImplementedError

    def finish(self, cost: str) -> list[bytes]:
        return self.held


def _data(event: bytes) -> dict[str, Any]:
    start = event.find(b"data: ")
    if start < 0:
        return {}
    try:
        value = orjson.loads(event[start + 6 :])
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class OpenAIChunks(Tracker):
    """`data: {chunk}` events ending in `data: [DONE]` (chat and legacy completions)."""

    def feed(self, event: bytes) -> bytes | None:
        if event.startswith(b"data: [DONE]"):
            self.ended = True
            return None
        if event.startswith(b'data: {"error"'):
            self.provider_error = str(_data(event).get("error"))
            return None
        if _USAGE.search(event):
            chunk = _data(event)
            found = openai_usage(chunk.get("usage"))
            if found is not None:
                self.usage = found
            if not self.client_wants_usage and not chunk.get("choices"):
                return None  # the usage chunk the gateway asked for on its own behalf
        return event

    def finish(self, cost: str) -> list[bytes]:
        # SSE comment lines are ignored by clients; this one carries the final cost.
        return [f": x-gateway-cost-usd {cost}\n\n".encode(), b"data: [DONE]\n\n"]


_RESPONSES_END = (
    b"event: response.completed",
    b"event: response.incomplete",
    b"event: response.failed",
)


class ResponsesEvents(Tracker):
    """Responses API events; `response.completed` carries usage and ends the stream."""

    def feed(self, event: bytes) -> bytes | None:
        if event.startswith(_RESPONSES_END):
            answer = _data(event).get("response") or {}
            self.usage = openai_usage(answer.get("usage"))
            self.answer = answer
            self.ended = True
            self.held.append(event)
            return None
        if event.startswith(b"event: error"):
            self.provider_error = str(_data(event).get("message") or "provider stream error")
            return None
        return event


class AnthropicEvents(Tracker):
    """Anthropic Messages events: usage in message_start and message_delta, then message_stop."""

    def __init__(self, client_wants_usage: bool = True) -> None:
        super().__init__(client_wants_usage)
        self._start: dict[str, Any] = {}
        self._output = 0

    def feed(self, event: bytes) -> bytes | None:
        if event.startswith(b"event: message_start"):
            self._start = dict((_data(event).get("message") or {}).get("usage") or {})
            self._output = int(self._start.get("output_tokens") or 0)
            self._update()
        elif event.startswith(b"event: message_delta"):
            usage = _data(event).get("usage") or {}
            for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
                if usage.get(key) is not None:
                    self._start[key] = usage[key]
            self._output = int(usage.get("output_tokens") or self._output)
            self._update()
        elif event.startswith(b"event: message_stop"):
            self.ended = True
            self.held.append(event)
            return None
        elif event.startswith(b"event: error"):
            self.provider_error = str((_data(event).get("error") or {}).get("message"))
            return None
        return event

    def _update(self) -> None:
        self.usage = anthropic_usage({**self._start, "output_tokens": self._output})


# --- error events inside a stream -------------------------------------------------------------


def openai_error_event(error: GatewayError) -> bytes:
    return b"data: " + orjson.dumps(error.openai_body()) + b"\n\n"


def responses_error_event(error: GatewayError) -> bytes:
    body = error.openai_body()
    data = {
        "type": "error",
        "code": error.code,
        "message": error.message,
        "param": error.param,
        **body,
    }
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_error_event(error: GatewayError) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(error.anthropic_body()) + b"\n\n"


# --- the endpoints -----------------------------------------------------------------------------

Caller = Callable[[Deployment, dict[str, Any], dict[str, str]], Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    name: str
    dialect: str
    validate: Callable[[dict[str, Any]], validation.Parsed]
    count_prompt: Callable[[str, dict[str, Any]], int]
    # The body fields that make up the prompt (for the reservation's upper bound).
    prompt_fields: tuple[str, ...]
    # Output tokens the client capped each generated answer at; None: uncapped (the
    # model's maximum output applies).
    requested_output: Callable[[dict[str, Any]], int | None]
    # How many answers one request generates (and the provider bills): `n`, `best_of`,
    # a list of prompts. flow._max_output multiplies the cap by it, capped or not.
    answers: Callable[[dict[str, Any]], int]
    usage_from_json: Callable[[dict[str, Any]], Usage | None]
    tracker: type[Tracker]
    error_event: Callable[[GatewayError], bytes]
    passthrough_providers: frozenset[str]
    call_json: Caller
    open_stream: Caller
    # Whether the provider must be asked for a usage chunk (stream_options.include_usage).
    asks_for_usage: bool = False
    # The body fields that may hold media content parts (image, file, document URLs).
    media_fields: tuple[str, ...] = ()

    def downloads_media_urls(self, deployment: Deployment) -> bool:
        """Whether serving this endpoint on `deployment` would make the gateway itself
        download a media URL found in the request.

        Pass-through forwards the body as is (the provider fetches, if anyone), and
        litellm's translation into OpenAI's dialect keeps image URLs as URLs. Every
        other translation (Anthropic from chat, Gemini, Bedrock, Ollama…) inlines media
        by downloading it, from inside our network: those requests are refused instead.
        """
        return (
            deployment.provider not in self.passthrough_providers
            and deployment.provider not in upstream.PASSTHROUGH_PROVIDERS
        )


def _one(body: dict[str, Any]) -> int:
    return 1


def _chat_answers(body: dict[str, Any]) -> int:
    return int(body.get("n") or 1)


def _prompt_count(prompt: Any) -> int:
    """Legacy completions answer each prompt of a list: strings or token arrays."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _completion_answers(body: dict[str, Any]) -> int:
    # `best_of` candidates are generated (and billed) server-side and `n` of them
    # returned; OpenAI requires best_of >= n, but the larger is the bound either way.
    per_prompt = max(int(body.get("n") or 1), int(body.get("best_of") or 1))
    return per_prompt * _prompt_count(body.get("prompt"))


def _chat_output(body: dict[str, Any]) -> int | None:
    requested = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(requested) if requested else None


def _openai_caller(
    path: str, litellm_call: Any, frame: Any = None, done: bytes = b""
) -> tuple[Caller, Caller]:
    async def call_json(
        deployment: Deployment, body: dict[str, Any], headers: dict[str, str]
    ) -> Any:
        if upstream.is_passthrough(deployment):
            payload = upstream.passthrough_payload(deployment, body)
            return await upstream.passthrough_json(
                upstream.openai_target(deployment, path), deployment, payload
            )
        return await upstream.litellm_json(litellm_call, deployment, body)

    async def open_stream(
        deployment: Deployment, body: dict[str, Any], headers: dict[str, str]
    ) -> Any:
        if upstream.is_passthrough(deployment):
            payload = upstream.passthrough_payload(deployment, body)
            return await upstream.passthrough_stream(
                upstream.openai_target(deployment, path), deployment, payload
            )
        return await upstream.litellm_stream(litellm_call, deployment, body, frame, done)

    return call_json, open_stream


async def _messages_json(
    deployment: Deployment, body: dict[str, Any], headers: dict[str, str]
) -> Any:
    if deployment.provider == "anthropic":
        payload = upstream.passthrough_payload(deployment, body)
        return await upstream.passthrough_json(
            upstream.anthropic_target(deployment, headers), deployment, payload
        )
    # Another dialect: litellm translates Messages to and from it.
    return await upstream.litellm_json(anthropic_messages.acreate, deployment, body)


async def _messages_stream(
    deployment: Deployment, body: dict[str, Any], headers: dict[str, str]
) -> Any:
    if deployment.provider == "anthropic":
        payload = upstream.passthrough_payload(deployment, body)
        return await upstream.passthrough_stream(
            upstream.anthropic_target(deployment, headers), deployment, payload
        )
    return await upstream.litellm_stream(anthropic_messages.acreate, deployment, body, None)


_chat_json, _chat_stream = _openai_caller(
    "chat/completions", litellm.acompletion, upstream.openai_chunk, b"data: [DONE]\n\n"
)
_completions_json, _completions_stream = _openai_caller(
    "completions", litellm.atext_completion, upstream.openai_chunk, b"data: [DONE]\n\n"
)
_responses_json, _responses_stream = _openai_caller(
    "responses", litellm.aresponses, upstream.typed_event
)
_embeddings_json, _embeddings_stream = _openai_caller("embeddings", litellm.aembedding)

CHAT = Endpoint(
    name="chat.completions",
    dialect="openai",
    validate=validation.validate_chat,
    count_prompt=count_chat,
    prompt_fields=("messages", "tools"),
    requested_output=_chat_output,
    answers=_chat_answers,
    usage_from_json=lambda data: openai_usage(data.get("usage")),
    tracker=OpenAIChunks,
    error_event=openai_error_event,
    passthrough_providers=upstream.PASSTHROUGH_PROVIDERS,
    call_json=_chat_json,
    open_stream=_chat_stream,
    asks_for_usage=True,
    media_fields=("messages",),
)

COMPLETIONS = Endpoint(
    name="completions",
    dialect="openai",
    validate=validation.validate_completions,
    count_prompt=_count_fields("prompt", "suffix"),
    prompt_fields=("prompt", "suffix"),
    # OpenAI defaults max_tokens to 16 here, but a provider behind litellm (or an
    # OpenAI-compatible server) need not: uncapped reserves the model's maximum.
    requested_output=lambda body: body.get("max_tokens"),
    answers=_completion_answers,
    usage_from_json=lambda data: openai_usage(data.get("usage")),
    tracker=OpenAIChunks,
    error_event=openai_error_event,
    passthrough_providers=upstream.PASSTHROUGH_PROVIDERS,
    call_json=_completions_json,
    open_stream=_completions_stream,
    asks_for_usage=True,
)

EMBEDDINGS = Endpoint(
    name="embeddings",
    dialect="openai",
    validate=validation.validate_embeddings,
    count_prompt=count_embedding_input,
    prompt_fields=("input",),
    requested_output=lambda body: 0,
    answers=_one,
    usage_from_json=lambda data: openai_usage(data.get("usage")),
    tracker=OpenAIChunks,
    error_event=openai_error_event,
    passthrough_providers=upstream.PASSTHROUGH_PROVIDERS,
    call_json=_embeddings_json,
    open_stream=_embeddings_stream,
)

RESPONSES = Endpoint(
    name="responses",
    dialect="openai",
    validate=validation.validate_responses,
    count_prompt=_count_fields("instructions", "input", "tools"),
    prompt_fields=("instructions", "input", "tools"),
    requested_output=lambda body: body.get("max_output_tokens"),
    answers=_one,
    usage_from_json=lambda data: openai_usage(data.get("usage")),
    tracker=ResponsesEvents,
    error_event=responses_error_event,
    passthrough_providers=upstream.PASSTHROUGH_PROVIDERS,
    call_json=_responses_json,
    open_stream=_responses_stream,
    media_fields=("input",),
)

MESSAGES = Endpoint(
    name="messages",
    dialect="anthropic",
    validate=validation.validate_messages,
    count_prompt=_count_fields("system", "messages", "tools"),
    prompt_fields=("system", "messages", "tools"),
    requested_output=lambda body: int(body["max_tokens"]),
    answers=_one,
    usage_from_json=lambda data: anthropic_usage(data.get("usage")),
    tracker=AnthropicEvents,
    error_event=anthropic_error_event,
    passthrough_providers=frozenset({"anthropic"}),
    call_json=_messages_json,
    open_stream=_messages_stream,
    media_fields=("system", "messages"),
)
