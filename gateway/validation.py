"""Checks on a client's request body before anything is routed or reserved.

Two promises live here:
- parameters we do not know are refused with a 400 that names them, instead of
  being dropped or forwarded blindly;
- nothing in a request can redirect the gateway to another host or credential
  (`api_base`, `api_key`, `custom_llm_provider`, …), at any depth of the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import GatewayError, invalid_request

# Routing and credential overrides that litellm (or a provider SDK) would honour if
# they reached it. Compared case-insensitively, at every depth of the body.
FORBIDDEN_KEYS = frozenset(
    {
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "api_endpoint",
        "custom_llm_provider",
        "organization",
        "azure_endpoint",
        "azure_ad_token",
        "azure_ad_token_provider",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region_name",
        "aws_bedrock_runtime_endpoint",
        "vertex_project",
        "vertex_location",
        "vertex_credentials",
        "extra_headers",
        "headers",
        "litellm_params",
        "litellm_metadata",
        "model_list",
        "mock_response",
        "user_config",
        "proxy",
        "proxies",
        "input_cost_per_token",
        "output_cost_per_token",
    }
)

# Where a request legitimately holds the client's own JSON Schemas: a tool may well
# have a property called "api_key", and that is not an override. Paths are keys
# from the top, with "*" for any list index.
_SCHEMA_PATHS = (
    ("tools", "*", "function", "parameters"),  # chat
    ("tools", "*", "parameters"),  # Responses API
    ("tools", "*", "input_schema"),  # Anthropic Messages
    ("functions", "*", "parameters"),  # legacy function calling
    ("response_format", "json_schema", "schema"),  # chat structured output
    ("text", "format", "schema"),  # Responses structured output
)


def _is_schema(path: tuple[str, ...]) -> bool:
    return any(
        len(path) == len(pattern)
        and all((p == "*" and s.isdigit()) or p == s for p, s in zip(pattern, path, strict=True))
        for pattern in _SCHEMA_PATHS
    )


CHAT_PARAMS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "n",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "seed",
        "service_tier",
        "store",
        "metadata",
        "modalities",
        "audio",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "verbosity",
        "prompt_cache_key",
        "safety_identifier",
    }
)

EMBEDDING_PARAMS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})

COMPLETION_PARAMS = frozenset(
    {
        "model",
        "prompt",
        "suffix",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "logprobs",
        "echo",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "best_of",
        "logit_bias",
        "user",
        "seed",
    }
)

RESPONSES_PARAMS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "temperature",
        "top_p",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "previous_response_id",
        "conversation",
        "prompt",
        "prompt_cache_key",
        "safety_identifier",
        "reasoning",
        "text",
        "truncation",
        "store",
        "stream",
        "stream_options",
        "include",
        "metadata",
        "user",
        "service_tier",
        "background",
    }
)

MESSAGES_PARAMS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
    }
)

# Parameters the gateway itself reads: `fallbacks`/`models` narrow the fallback
# chain; they are never forwarded to a provider.
ROUTING_PARAMS = frozenset({"fallbacks", "models"})
GATEWAY_PARAMS = frozenset({"metadata", *ROUTING_PARAMS})


@dataclass(frozen=True)
class Parsed:
    model: str
    stream: bool
    end_user: str = ""
    # The client's own fallback list (None: the model's configured fallbacks).
    fallbacks: tuple[str, ...] | None = None


# No provider request nests anywhere near this deep; a body that does is refused
# before anything recurses into it (or serialises it again for a provider).
MAX_DEPTH = 64


def find_forbidden(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """The dotted path of the first routing/credential override in `value`, if any."""
    if len(path) > MAX_DEPTH:
        raise invalid_request(
            f"The request body is nested more than {MAX_DEPTH} levels deep; flatten it.",
            param=_dotted(path[:3]) + "…",
            code="too_deeply_nested",
        )
    if isinstance(value, dict):
        for key, child in value.items():
            name = str(key)
            here = (*path, name)
            if name.lower() in FORBIDDEN_KEYS:
                return _dotted(here)
            if _is_schema(here):
                continue
            found = find_forbidden(child, here)
            if found:
                return found
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found = find_forbidden(child, (*path, str(index)))
            if found:
                return found
    return None


def _dotted(path: tuple[str, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


# Content parts that carry media by reference. A provider given one of these through
# litellm's translation (Anthropic from chat, Gemini, Bedrock…) would make litellm
# download the URL itself, from inside our network.
MEDIA_PART_TYPES = frozenset(
    {
        "image_url",  # chat
        "file",  # chat (file.file_id may be a URL)
        "video_url",  # chat, litellm's Gemini extension
        "audio_url",
        "input_image",  # Responses
        "input_file",  # Responses
        "input_video",
        "image",  # Anthropic Messages (source.type "url")
        "document",  # Anthropic Messages
    }
)


def _remote(value: str) -> bool:
    # Case and leading blanks do not matter: some HTTP client along the way may forgive them.
    return value.lstrip()[:6].lower().startswith(("http:", "https:"))


def find_remote_media(value: Any, path: tuple[str, ...] = (), in_media: bool = False) -> str | None:
    """The dotted path of the first http(s) URL inside a media content part, if any.

    Inline `data:` URLs are fine; text that merely mentions a URL is not a media part.
    The body was already walked by `find_forbidden`, so its depth is bounded.
    """
    if isinstance(value, str):
        return _dotted(path) if in_media and _remote(value) else None
    if isinstance(value, dict):
        in_media = in_media or value.get("type") in MEDIA_PART_TYPES
        for key, child in value.items():
            found = find_remote_media(child, (*path, str(key)), in_media)
            if found:
                return found
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found = find_remote_media(child, (*path, str(index)), in_media)
            if found:
                return found
    return None


def refuse_overrides(body: dict[str, Any]) -> None:
    found = find_forbidden(body)
    if found:
        raise invalid_request(
            f"'{found}' is not allowed: the gateway decides which provider, endpoint and "
            "credentials serve a model. Remove it and pick a configured model by name.",
            param=found,
            code="forbidden_parameter",
        )


def _unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name not in allowed:
            raise invalid_request(
                f"Unrecognized request argument supplied: {name}. Remove it; see /v1/models "
                "for what each model supports.",
                param=name,
                code="unknown_parameter",
            )


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid_request(f"'{name}' must be a number from {low:g} to {high:g}.", param=name)


def _positive_int(body: dict[str, Any], name: str, high: int = 10_000_000) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise invalid_request(f"'{name}' must be a whole number from 1 to {high}.", param=name)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid_request(
            "'model' is required: the name of a model from /v1/models.", param="model"
        )
    return model


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise invalid_request("'stream' must be true or false.", param="stream")
    return stream


def _fallbacks(body: dict[str, Any]) -> tuple[str, ...] | None:
    """OpenRouter-style `models` (an ordered list to try) or LiteLLM-style `fallbacks`."""
    for name in ("fallbacks", "models"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
            raise invalid_request(f"'{name}' must be an array of model names.", param=name)
        if len(value) > 10:
            raise invalid_request(f"'{name}' may name at most 10 models.", param=name)
        if name == "models":
            # `models` lists every model to try, the requested one included.
            return tuple(m for m in value if m != body.get("model"))
        return tuple(value)
    return None


def _model_or_first_of_models(body: dict[str, Any]) -> str:
    if not body.get("model") and isinstance(body.get("models"), list) and body["models"]:
        body["model"] = body["models"][0]
    return _model(body)


def _user(body: dict[str, Any]) -> str:
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256 or "\x00" in user):
        raise invalid_request(
            "'user' must be a string of at most 256 characters, without NUL characters.",
            param="user",
        )
    return user or ""


def _stream_options(body: dict[str, Any], stream: bool) -> None:
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_request("'stream_options' must be an object.", param="stream_options")
        if not stream:
            raise invalid_request(
                "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
            )


# --- what the ledger cannot price ---------------------------------------------------------------
#
# The ledger records tokens at each model's token prices. Features a provider bills
# on top (per search, per session, per container-hour, audio tokens, premium service
# tiers) would be served and never charged, and a reservation could not bound them:
# they are refused with a 400 naming the parameter until they are priced.

# The OpenAI service tiers billed at the model's list price; the others ("priority",
# "flex", "scale", and any tier added later) change the per-token price.
_LIST_PRICE_TIERS = frozenset({"auto", "default"})
# Responses tools the client runs itself and pays for in tokens only.
_RESPONSES_CLIENT_TOOLS = frozenset({"function", "custom"})
# Anthropic server tools: web search and code execution have per-use fees, and web
# fetch pulls in content of unbounded size the reservation cannot cover. (Client
# tools carry no type or "custom"; bash/text_editor/computer run on the client.)
_ANTHROPIC_SERVER_TOOLS = ("web_search_", "web_fetch_", "code_execution_")


def unpriced(message: str, param: str) -> GatewayError:
    return invalid_request(
        f"{message} The gateway cannot bill it yet, so it refuses the request instead of "
        "serving it unbilled.",
        param=param,
        code="unpriced_feature",
    )


def _priced_tier(body: dict[str, Any]) -> None:
    tier = body.get("service_tier")
    if tier is not None and tier not in _LIST_PRICE_TIERS:
        raise unpriced(
            f"'service_tier': '{tier}' is billed at a different price; use 'auto' or "
            "'default', or leave it out.",
            "service_tier",
        )


def _refuse_unpriced_chat(body: dict[str, Any]) -> None:
    if body.get("web_search_options") is not None:
        raise unpriced(
            "'web_search_options' adds a per-search fee; remove it.", "web_search_options"
        )
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise unpriced(
            "Audio output ('modalities' with \"audio\") is billed per audio token; ask for "
            '["text"] only.',
            "modalities",
        )
    if body.get("audio") is not None:
        raise unpriced("'audio' output is billed per audio token; remove it.", "audio")
    _priced_tier(body)


def _refuse_unpriced_responses(body: dict[str, Any]) -> None:
    if body.get("background"):
        raise invalid_request(
            "'background': true is not supported: the gateway bills a response when it "
            "finishes and would never see a background one finish. Send the request "
            "without 'background' (stream it if it is long).",
            param="background",
            code="unsupported_parameter",
        )
    if body.get("conversation") is not None:
        raise invalid_request(
            "'conversation' is not supported: this gateway has no Conversations API, so no "
            "conversation id can be yours. Send the context in 'input', or continue from "
            "a response with 'previous_response_id'.",
            param="conversation",
            code="unsupported_parameter",
        )
    response_id = body.get("previous_response_id")
    if response_id is not None and not isinstance(response_id, str):
        raise invalid_request(
            "'previous_response_id' must be a response id string.", param="previous_response_id"
        )
    tools = body.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in _RESPONSES_CLIENT_TOOLS:
            raise unpriced(
                f"The hosted tool {kind!r} in 'tools[{index}]' is billed per call or per "
                "session; use 'function' tools and run the tool yourself.",
                f"tools[{index}].type",
            )
    _priced_tier(body)


def _refuse_unpriced_messages(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith(_ANTHROPIC_SERVER_TOOLS):
            raise unpriced(
                f"tools.{index}.type: the server tool '{kind}' is billed per use; define a "
                "client tool and run it yourself.",
                f"tools.{index}.type",
            )
    if body.get("mcp_servers"):
        raise unpriced(
            "mcp_servers: remote MCP tool calls run on Anthropic's side; remove them.",
            "mcp_servers",
        )
    if body.get("container") is not None:
        raise unpriced(
            "container: code-execution containers are billed per hour; remove it.", "container"
        )


def validate_chat(body: dict[str, Any]) -> Parsed:
    refuse_overrides(body)
    _unknown(body, CHAT_PARAMS | ROUTING_PARAMS)
    model = _model_or_first_of_models(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("'messages' must be a non-empty array of messages.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_request(
                f"messages[{index}] must be an object with a 'role'.", param=f"messages[{index}]"
            )
    stream = _stream(body)
    _stream_options(body, stream)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _positive_int(body, "n", 128)
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _tools(body)
    _refuse_unpriced_chat(body)
    return Parsed(model, stream, _user(body), _fallbacks(body))


def _tools(body: dict[str, Any]) -> None:
    if "tools" in body and not isinstance(body["tools"], list):
        raise invalid_request("'tools' must be an array of tool definitions.", param="tools")


def validate_completions(body: dict[str, Any]) -> Parsed:
    refuse_overrides(body)
    _unknown(body, COMPLETION_PARAMS | ROUTING_PARAMS)
    model = _model_or_first_of_models(body)
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise invalid_request(
            "'prompt' is required: a string or an array of strings.", param="prompt"
        )
    if not isinstance(prompt, str | list):
        raise invalid_request("'prompt' must be a string or an array.", param="prompt")
    stream = _stream(body)
    _stream_options(body, stream)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _positive_int(body, "n", 128)
    _positive_int(body, "best_of", 20)
    _positive_int(body, "max_tokens")
    return Parsed(model, stream, _user(body), _fallbacks(body))


def validate_responses(body: dict[str, Any]) -> Parsed:
    refuse_overrides(body)
    _unknown(body, RESPONSES_PARAMS | ROUTING_PARAMS)
    model = _model_or_first_of_models(body)
    value = body.get("input")
    if value is None or value == "" or value == []:
        raise invalid_request(
            "'input' is required: a string or an array of input items.", param="input"
        )
    if not isinstance(value, str | list):
        raise invalid_request("'input' must be a string or an array of input items.", param="input")
    stream = _stream(body)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _positive_int(body, "max_output_tokens")
    _tools(body)
    _refuse_unpriced_responses(body)
    return Parsed(model, stream, _user(body), _fallbacks(body))


def validate_messages(body: dict[str, Any]) -> Parsed:
    """Anthropic's Messages API: max_tokens is required, as Anthropic requires it."""
    refuse_overrides(body)
    _unknown(body, MESSAGES_PARAMS | ROUTING_PARAMS)
    model = _model_or_first_of_models(body)
    if "max_tokens" not in body:
        raise invalid_request("max_tokens: Field required", param="max_tokens")
    _positive_int(body, "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages: must be a non-empty array of messages", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise invalid_request(
                f"messages.{index}.role: must be 'user' or 'assistant'",
                param=f"messages.{index}.role",
            )
        if "content" not in message:
            raise invalid_request(
                f"messages.{index}.content: Field required", param=f"messages.{index}.content"
            )
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise invalid_request("system: must be a string or an array of text blocks", param="system")
    _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    _positive_int(body, "top_k", 1_000_000)
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(x, str) for x in stops)
    ):
        raise invalid_request("stop_sequences: must be an array of strings", param="stop_sequences")
    _tools(body)
    _refuse_unpriced_messages(body)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid_request("metadata: must be an object", param="metadata")
    user = (metadata or {}).get("user_id") or ""
    # The end user and tags are stored in the ledger: Postgres text cannot hold NUL.
    if not isinstance(user, str) or len(user) > 256 or "\x00" in user:
        raise invalid_request(
            "metadata.user_id: must be a string of at most 256 characters, without NUL characters",
            param="metadata.user_id",
        )
    return Parsed(model, _stream(body), user, _fallbacks(body))


def validate_embeddings(body: dict[str, Any]) -> Parsed:
    refuse_overrides(body)
    _unknown(body, EMBEDDING_PARAMS)
    model = _model(body)
    value = body.get("input")
    if value is None or value == "" or value == []:
        raise invalid_request(
            "'input' is required: a string or an array of strings.", param="input"
        )
    if not isinstance(value, str | list):
        raise invalid_request("'input' must be a string or an array.", param="input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise invalid_request(
            "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
        )
    _positive_int(body, "dimensions", 100_000)
    return Parsed(model, False, _user(body))


def tags_from(header: str | None, metadata: Any) -> list[str]:
    tags: list[str] = []
    if header:
        tags.extend(part.strip() for part in header.split(",") if part.strip())
    if isinstance(metadata, dict) and "tags" in metadata:
        extra = metadata["tags"]
        if not isinstance(extra, list) or not all(isinstance(t, str) for t in extra):
            raise invalid_request(
                "'metadata.tags' must be an array of strings.", param="metadata.tags"
            )
        tags.extend(t.strip() for t in extra if t.strip())
    if len(tags) > 20 or any(len(t) > 64 or "\x00" in t for t in tags):
        raise invalid_request(
            "At most 20 tags of up to 64 characters each, without NUL characters "
            "(x-gateway-tags or metadata.tags).",
            param="metadata.tags",
        )
    return list(dict.fromkeys(tags))


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GatewayError("The request body must be a JSON object.", 400, code="invalid_json")
    return body
