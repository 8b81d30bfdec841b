"""Promise 11: bad input never breaks the gateway, and every error says so in the
documented shape.

Hypothesis sends /v1/chat/completions, /v1/messages and every /api/admin operation
(enumerated from the live OpenAPI schema) random and almost-valid JSON: wrong types,
huge numbers, unicode, nulls, deep nesting, invalid JSON bytes and wrong content types.
The upstream is the healthy mock, so no answer may be a 500, and none may be a 502/503/
504 either (those would come from our own code, not the provider). Every error is JSON
in OpenAI's shape, or Anthropic's on /v1/messages. The default run is bounded and
derandomized; `make soak` runs many more, freshly random, examples.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.proofs.conftest import SOAK
from tests.support.http import anthropic_error_shape, openai_error_shape

pytestmark = pytest.mark.e2e

EXAMPLES = 2000 if SOAK else 150
ADMIN_EXAMPLES = 3000 if SOAK else 300
CLAUDE = "claude-3-5-haiku-20241022"
BROKEN = (500, 502, 503, 504)


def fuzz_settings(examples: int) -> settings:
    # Shrinking a failure can take longer than the run itself: `make test` reports the
    # example as found (the tests below pin each bug found so far), `make soak` shrinks.
    phases = list(Phase) if SOAK else [p for p in Phase if p is not Phase.shrink]
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not SOAK,
        phases=phases,
        suppress_health_check=list(HealthCheck),
    )


# --- values -------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["", " ", "\x00", "\u202e", "\U0001d518", "null", "[]", "{}", "1e400"])
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)


DEEP = "\u2063deep\u2063"  # stands in for a deeply nested value until the body is encoded


def deep_text(depth: int, kind: str) -> str:
    """JSON nested `depth` levels (written out: Python's encoder stops near 1000 levels)."""
    if kind == "list":
        return "[" * depth + '"x"' + "]" * depth
    return '{"a":' * depth + '"x"' + "}" * depth


def encode(body: Any, deep: str, ascii_only: bool) -> bytes:
    raw = json.dumps(body, ensure_ascii=ascii_only)
    return raw.replace(json.dumps(DEEP, ensure_ascii=ascii_only), deep).encode()


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Seven times in eight a valid value, else anything at all (valid ones shrink first).

    (Not `one_of(valid, valid, ..., values)`: one_of drops repeated branches.)"""
    return st.sampled_from(range(8)).flatmap(lambda i: values if i == 7 else valid)


def often(times: int) -> st.SearchStrategy[bool]:
    """True except once in `times`."""
    return st.sampled_from([True] * (times - 1) + [False])


@st.composite
def bodies(
    draw: st.DrawFn,
    required: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]],
) -> Any:
    """Usually an almost valid body: the required fields, a few optional ones, each
    valid most of the time; sometimes anything at all, or something deeply nested."""
    kind = draw(st.sampled_from(["mutated"] * 12 + ["random", "deep"]))
    if kind == "random":
        return draw(values)
    body = {}
    for name, valid in required.items():
        if draw(often(20)):
            body[name] = draw(mostly(valid))
    if optional:
        for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
            body[name] = draw(mostly(optional[name]))
    if not draw(often(20)):
        body.update(draw(st.dictionaries(st.text(max_size=12), values, min_size=1, max_size=2)))
    if kind == "deep":
        body[draw(st.sampled_from([*required, *optional, "extra"]))] = DEEP
    return body


@st.composite
def requests(draw: st.DrawFn, body_strategy: st.SearchStrategy[Any]) -> tuple[bytes, str | None]:
    """(raw body, content type): JSON mostly, sometimes broken bytes or the wrong type."""
    how = draw(st.sampled_from(["json"] * 12 + ["bytes", "truncated", "form", "text"]))
    body = draw(body_strategy)
    # Depths around the limits that matter: orjson writes 254 levels, reads 1024.
    depth = draw(st.sampled_from([100, 254, 255, 300, 600, 990, 1000, 1024, 1025, 3000]))
    nested = deep_text(depth, draw(st.sampled_from(["list", "dict"])))
    raw = encode(body, nested, draw(st.booleans()))
    if how == "bytes":
        return draw(st.binary(max_size=200)), "application/json"
    if how == "truncated":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))], "application/json"
    if how == "form":
        return raw, draw(
            st.sampled_from(
                ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
            )
        )
    if how == "text":
        return raw, "text/plain; charset=latin-1"
    return raw, "application/json"


text = st.text(max_size=60)
unicode_text = text | st.sampled_from(["héllo", "你好", "🙂" * 20, "\u202eevil", "a\x00b"])


def chat_fields(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    message = st.fixed_dictionaries(
        {"role": mostly(st.sampled_from(["user", "system", "assistant"]))},
        optional={"content": mostly(unicode_text), "name": mostly(st.text(max_size=8))},
    )
    tool = st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True)},
                optional={"parameters": st.just({"type": "object", "properties": {}})},
            ),
        }
    )
    required = {
        "model": st.just(model),
        "messages": st.lists(message, min_size=1, max_size=3),
    }
    optional = {
        "stream": st.booleans(),
        "max_tokens": st.integers(1, 300),
        "max_completion_tokens": st.integers(1, 300),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "n": st.integers(1, 3),
        "stop": unicode_text | st.lists(text, max_size=3),
        "user": st.text(max_size=300),
        "seed": st.integers(),
        "tools": st.lists(tool, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
        "metadata": st.fixed_dictionaries({"tags": st.lists(st.text(max_size=70), max_size=3)}),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "logit_bias": st.dictionaries(st.text(max_size=5), st.integers(-100, 100), max_size=2),
        "presence_penalty": st.floats(-2, 2),
        "fallbacks": st.lists(st.just(model), max_size=2),
        "models": st.lists(st.just(model), max_size=2),
    }
    return required, optional


def messages_fields(models: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    block = st.fixed_dictionaries({"type": st.just("text"), "text": unicode_text})
    message = st.fixed_dictionaries(
        {
            "role": mostly(st.sampled_from(["user", "assistant"])),
            "content": mostly(unicode_text | st.lists(block, min_size=1, max_size=2)),
        }
    )
    required = {
        "model": st.sampled_from(models),
        "messages": st.lists(message, min_size=1, max_size=3).map(
            lambda ms: [{**ms[0], "role": "user"}, *ms[1:]]
        ),
        "max_tokens": st.integers(1, 300),
    }
    optional = {
        "system": unicode_text | st.lists(block, max_size=2),
        "stream": st.booleans(),
        "temperature": st.floats(0, 1),
        "top_k": st.integers(1, 50),
        "top_p": st.floats(0, 1),
        "stop_sequences": st.lists(text, max_size=3),
        "metadata": st.fixed_dictionaries({"user_id": st.text(max_size=300)}),
        "tools": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
                    "input_schema": st.just({"type": "object", "properties": {}}),
                }
            ),
            max_size=2,
        ),
    }
    return required, optional


def from_schema(prop: dict[str, Any], components: dict[str, Any], depth: int = 0) -> Any:
    """A strategy for values of a (small) JSON Schema, as the OpenAPI document gives it."""
    if "$ref" in prop:
        if depth > 2:
            return values
        target = components.get(prop["$ref"].rsplit("/", 1)[-1], {})
        return from_schema(target, components, depth + 1)
    if "anyOf" in prop:
        return st.one_of(*[from_schema(p, components, depth) for p in prop["anyOf"]])
    if "enum" in prop:
        return st.sampled_from(prop["enum"])
    kind = prop.get("type")
    if kind == "string":
        if prop.get("format") == "date-time":
            return st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())
        return unicode_text | st.just("https://example.com/hook")
    if kind == "integer":
        return st.integers(-2, 2000) | st.integers(-(2**70), 2**70)
    if kind == "number":
        return st.floats(-10, 1e6, allow_nan=False) | st.decimals(
            allow_nan=False, allow_infinity=False, places=8
        ).map(str)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(from_schema(prop.get("items", {}), components, depth + 1), max_size=3)
    if kind == "object":
        properties = prop.get("properties") or {}
        if properties and depth < 3:
            optional = {k: from_schema(v, components, depth + 1) for k, v in properties.items()}
            return st.fixed_dictionaries({}, optional=optional)
        return st.dictionaries(st.text(max_size=8), scalars, max_size=3)
    if kind == "null":
        return st.none()
    return values


# --- checks ---------------------------------------------------------------------------------------


def check(response: httpx.Response, *, anthropic: bool = False, label: str = "") -> None:
    where = f"{label} -> {response.status_code}: {response.text[:300]!r}"
    assert response.status_code not in BROKEN, where
    content_type = response.headers.get("content-type", "")
    if response.status_code >= 400:
        assert content_type.startswith("application/json"), where
        shape = anthropic_error_shape if anthropic else openai_error_shape
        assert shape(response.json()), where
    elif content_type.startswith("text/event-stream"):
        # A stream either ends cleanly or says why it did not, in the stream.
        text = response.text
        finished = "data: [DONE]" in text or "message_stop" in text
        assert finished or '"error"' in text, where
    elif response.status_code != 204 and content_type.startswith("application/json"):
        response.json()


def post(client: httpx.Client, path: str, raw: bytes, content_type: str | None) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return client.post(path, content=raw, headers=headers)


def test_fuzzed_chat_completions_never_break(live_gateway, make_model, make_key):
    model = make_model(name=f"fuzz-gpt-{uuid.uuid4().hex[:8]}")
    secret = make_key().secret
    client = httpx.Client(
        base_url=live_gateway.v1, timeout=60, headers={"authorization": f"Bearer {secret}"}
    )

    @fuzz_settings(EXAMPLES)
    @given(requests(bodies(*chat_fields(model.name))))
    def run(request: tuple[bytes, str | None]) -> None:
        raw, content_type = request
        check(post(client, "/chat/completions", raw, content_type), label=repr(raw[:300]))

    try:
        run()
    finally:
        client.close()


def test_fuzzed_messages_never_break(live_gateway, mock_upstream, make_model, make_key):
    tag = uuid.uuid4().hex[:8]
    claude = make_model(
        name=f"fuzz-claude-{tag}",
        provider_model=f"anthropic/{CLAUDE};id={tag}",
        api_base=mock_upstream.url,
    )
    gpt = make_model(name=f"fuzz-gpt-{tag}")  # Messages translated by litellm
    secret = make_key().secret
    client = httpx.Client(base_url=live_gateway.url, timeout=60, headers={"x-api-key": secret})

    @fuzz_settings(EXAMPLES)
    @given(requests(bodies(*messages_fields([claude.name, gpt.name]))))
    def run(request: tuple[bytes, str | None]) -> None:
        raw, content_type = request
        response = post(client, "/v1/messages", raw, content_type)
        check(response, anthropic=True, label=repr(raw[:300]))

    try:
        run()
    finally:
        client.close()


def test_a_messages_body_litellm_cannot_translate_is_a_400_and_cools_nothing_down(
    live_gateway, mock_upstream, make_model, make_key
):
    """Found by the fuzzer: on an OpenAI-dialect deployment, /v1/messages goes through
    litellm, which refuses this body itself (the provider is never called). That is the
    client's error: a 400, with no retries and no failure counted against the deployment,
    so other clients of the model are not locked out."""
    model = make_model(name=f"fuzz-found-{uuid.uuid4().hex[:8]}")
    body = {
        "model": model.name,
        "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
        "max_tokens": 1,
    }
    refused = httpx.post(
        f"{live_gateway.v1}/messages",
        json=body,
        headers={"x-api-key": make_key().secret},
        timeout=30,
    )
    other = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json={"model": model.name, "messages": [{"role": "user", "content": "hello"}]},
        headers={"authorization": f"Bearer {make_key().secret}"},
        timeout=30,
    )

    assert mock_upstream.calls(model.name) <= 1, "the gateway retried a request refused as invalid"
    assert other.status_code == 200, (
        f"another client was locked out: {other.status_code} {other.text}"
    )
    assert refused.status_code == 400, (refused.status_code, refused.text)
    assert anthropic_error_shape(refused.json()), refused.text


def test_deeply_nested_json_is_answered_never_a_500(
    live_gateway, mock_upstream, make_model, make_key
):
    """Found by the fuzzer: JSON nested deeper than the gateway can re-encode (orjson
    writes 254 levels) or walk (Python's recursion limit, near 1000) but within what it
    accepts (1024 levels) crashed the request. It must be served or refused with a 400."""
    tag = uuid.uuid4().hex[:8]
    gpt = make_model(name=f"deep-gpt-{tag}")
    claude = make_model(
        name=f"deep-claude-{tag}",
        provider_model=f"anthropic/{CLAUDE};id={tag}",
        api_base=mock_upstream.url,
    )
    secret = make_key().secret
    failures = []
    for depth in (300, 1000):
        for path, model, field in (
            ("/chat/completions", gpt.name, "stop"),  # forwarded to the provider
            ("/chat/completions", gpt.name, "metadata"),  # kept by the gateway
            ("/messages", claude.name, "metadata"),
        ):
            nested = deep_text(depth, "dict" if field == "metadata" else "list")
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], field: DEEP}
            if path == "/messages":
                body["max_tokens"] = 5
            response = httpx.post(
                f"{live_gateway.v1}{path}",
                content=encode(body, nested, True),
                headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
                timeout=30,
            )
            try:
                check(response, anthropic=path == "/messages", label=f"{path} {field} x{depth}")
            except AssertionError as exc:
                failures.append(str(exc)[:300])
    assert failures == [], "\n".join(failures)


def test_out_of_range_paging_is_a_400_never_a_500(live_gateway):
    """Found by the fuzzer: an offset past the database's bigint crashed list routes."""
    with live_gateway.admin() as admin:
        answers = {
            path: admin.get(path, params={"offset": str(2**63)})
            for path in ("/teams", "/keys", "/models", "/ledger", "/invoices", "/aliases")
        }
    failures = []
    for path, response in answers.items():
        try:
            check(response, label=f"GET {path}?offset=2**63")
        except AssertionError as exc:
            failures.append(str(exc)[:300])
    assert failures == [], "\n".join(failures)


def test_fuzzed_management_calls_never_break(live_gateway, make_model, make_key, mock_upstream):
    schema = httpx.get(f"{live_gateway.url}/api/openapi.json", timeout=30).json()
    components = schema.get("components", {}).get("schemas", {})
    operations = [
        (method.upper(), path, operation)
        for path, ops in schema["paths"].items()
        if path.startswith("/api/admin")
        for method, operation in ops.items()
    ]
    assert len(operations) > 20
    issued = make_key()
    model = make_model(name=f"fuzz-admin-{uuid.uuid4().hex[:8]}")
    # Real ids now and then, so calls get past "not found" into validation.
    known = st.sampled_from(
        [issued.key.id, issued.key.team_id, str(model.public_id), model.name, 0, -1, 2**63]
    )
    path_values = mostly(known).map(lambda v: "" if v is None else str(v))
    client = live_gateway.admin()
    client.base_url = httpx.URL(live_gateway.url)

    @fuzz_settings(ADMIN_EXAMPLES)
    @given(
        st.sampled_from(operations),
        st.data(),
    )
    def run(operation: tuple[str, str, dict[str, Any]], data: st.DataObject) -> None:
        method, template, spec = operation
        params = spec.get("parameters", [])
        path = template
        for param in params:
            if param["in"] == "path":
                value = str(data.draw(path_values))
                path = path.replace("{" + param["name"] + "}", quote(value, safe="") or "x")
        query = {
            p["name"]: data.draw(mostly(from_schema(p.get("schema", {}), components)).map(_text))
            for p in params
            if p["in"] == "query" and (p.get("required") or data.draw(st.booleans()))
        }
        required, optional = _body_fields(schema, spec)
        raw, content_type = data.draw(requests(bodies(required, optional)))
        headers = {"content-type": content_type} if content_type else {}
        sends_body = "requestBody" in spec or data.draw(st.booleans())
        response = client.request(
            method,
            path,
            params=query,
            content=raw if sends_body else None,
            headers=headers if sends_body else {},
        )
        check(response, label=f"{method} {path} {query} {raw[:200]!r}")

    try:
        run()
    finally:
        client.close()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value)


def _body_fields(
    schema: dict[str, Any], spec: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Strategies for an operation's JSON body fields (required, optional), from the schema."""
    components = schema.get("components", {}).get("schemas", {})
    content = spec.get("requestBody", {}).get("content", {}).get("application/json", {})
    body = from_schema_node(content.get("schema", {}), components)
    properties = body.get("properties", {})
    required = set(body.get("required", []))
    strategies = {name: from_schema(prop, components) for name, prop in properties.items()}
    return (
        {k: v for k, v in strategies.items() if k in required},
        {k: v for k, v in strategies.items() if k not in required},
    )


def from_schema_node(node: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return dict(components.get(node["$ref"].rsplit("/", 1)[-1], {}))
    if "anyOf" in node:
        for option in node["anyOf"]:
            found = from_schema_node(option, components)
            if found.get("properties"):
                return found
    return node
