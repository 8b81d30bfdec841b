"""Checks on a client's request body before anything is routed or reserved.

Two promises live here:
- parameters we do not know are refused with a 400 that names them, instead of
  being dropped or forwarded blindly;
- nothing in a request can redirect the gateway to another host or credential
  (`api_base`, `api_key`, `custom_llm_provider`, …), at any depth of the body.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError, invalid_request

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

# Subtrees that hold a client's own JSON Schemas or free-form data: a tool may well
# have a property called "api_key", and that is not an override.
_SCHEMA_PARENTS = frozenset({"parameters", "schema", "input_schema", "properties"})

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

# Parameters the gateway itself reads and never forwards.
GATEWAY_PARAMS = frozenset({"metadata"})


def find_forbidden(value: Any, path: str = "") -> str | None:
    """The dotted path of the first routing/credential override in `value`, if any."""
    if isinstance(value, dict):
        for key, child in value.items():
            name = str(key)
            here = f"{path}.{name}" if path else name
            if name.lower() in FORBIDDEN_KEYS:
                return here
            if name in _SCHEMA_PARENTS and isinstance(child, dict):
                continue
            found = find_forbidden(child, here)
            if found:
                return found
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found = find_forbidden(child, f"{path}[{index}]")
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


def validate_chat(body: dict[str, Any]) -> tuple[str, bool]:
    refuse_overrides(body)
    _unknown(body, CHAT_PARAMS)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("'messages' must be a non-empty array of messages.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_request(
                f"messages[{index}] must be an object with a 'role'.", param=f"messages[{index}]"
            )
    stream = _stream(body)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_request("'stream_options' must be an object.", param="stream_options")
        if not stream:
            raise invalid_request(
                "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
            )
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _positive_int(body, "n", 128)
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    if "tools" in body and not isinstance(body["tools"], list):
        raise invalid_request("'tools' must be an array of tool definitions.", param="tools")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise invalid_request("'user' must be a string of at most 256 characters.", param="user")
    return model, stream


def validate_embeddings(body: dict[str, Any]) -> str:
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
    return model


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
    if len(tags) > 20 or any(len(t) > 64 for t in tags):
        raise invalid_request(
            "At most 20 tags of up to 64 characters each (x-gateway-tags or metadata.tags).",
            param="metadata.tags",
        )
    return list(dict.fromkeys(tags))


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GatewayError("The request body must be a JSON object.", 400, code="invalid_json")
    return body
