"""Nothing a client sends can point the gateway at another host or credential.

A canary TCP listener counts every connection made to it; requests that try to
redirect the gateway there (at any depth of the body) must be refused with a 400
naming the offending path, and the canary must see nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionFunctionToolParam

from tests.support.http import assert_openai_error, chat, check_each, content_of, first_tool_call
from tests.support.listeners import Canary, open_canary

pytestmark = pytest.mark.e2e


@pytest.fixture
def canary() -> Iterator[Canary]:
    with open_canary() as trap:
        yield trap


def settle_and_count(trap: Canary) -> int:
    # Give any stray outbound connection time to land before reading the counter.
    time.sleep(0.3)
    return trap.count()


def override_bodies(model: str, url: str) -> list[tuple[dict, str, str]]:
    """(body, path the error must name, forbidden key) for each way of smuggling an override."""
    hello = {"role": "user", "content": "Hello"}
    return [
        ({"model": model, "messages": [hello], "api_base": url}, "api_base", "api_base"),
        ({"model": model, "messages": [hello], "base_url": url}, "base_url", "base_url"),
        ({"model": model, "messages": [hello], "api_key": "sk-attacker"}, "api_key", "api_key"),
        (
            {"model": model, "messages": [hello], "custom_llm_provider": "openai", "api_base": url},
            "",
            "",
        ),
        (
            {"model": model, "messages": [hello], "extra_headers": {"x-target": url}},
            "extra_headers",
            "extra_headers",
        ),
        (
            {"model": model, "messages": [hello], "metadata": {"api_base": url}},
            "metadata",
            "api_base",
        ),
        (
            {"model": model, "messages": [hello], "metadata": {"deep": [{"base_url": url}]}},
            "metadata",
            "base_url",
        ),
        (
            {"model": model, "messages": [{**hello, "api_base": url}]},
            "messages",
            "api_base",
        ),
        (
            {"model": model, "messages": [{**hello, "api_key": "sk-attacker"}]},
            "messages",
            "api_key",
        ),
        (
            {
                "model": model,
                "messages": [hello],
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object"}},
                        "api_base": url,
                    }
                ],
            },
            "tools",
            "api_base",
        ),
        (
            {"model": model, "messages": [hello], "stream": True, "api_base": url},
            "api_base",
            "api_base",
        ),
    ]


def assert_forbidden(response: httpx.Response, parent: str, key: str) -> None:
    error = assert_openai_error(
        response, 400, code="forbidden_parameter", type="invalid_request_error"
    )
    param = error["param"]
    assert isinstance(param, str) and param, error
    if key:
        assert param.split(".")[-1].split("[")[0] == key or param.endswith(key), error
    if parent:
        assert param.startswith(parent), error


def test_it_refuses_every_routing_override_and_never_connects_to_it(
    live_gateway, make_model, make_key, canary, mock_upstream
):
    model = make_model()
    issued = make_key()
    failures = []

    for url in canary.urls:
        for body, parent, key in override_bodies(model.name, url):
            response = chat(live_gateway.v1, issued.secret, body)
            try:
                if key:
                    assert_forbidden(response, parent, key)
                else:
                    error = assert_openai_error(response, 400, code="forbidden_parameter")
                    assert error["param"] in ("custom_llm_provider", "api_base"), error
            except AssertionError as exc:
                failures.append(f"{json.dumps(body)[:160]} -> {response.status_code}: {exc}")

    assert settle_and_count(canary) == 0
    assert not failures, "\n".join(failures)
    assert mock_upstream.calls(model.name) == 0


def test_it_refuses_an_override_under_a_schema_like_key_that_is_not_a_schema(
    live_gateway, make_model, make_key, canary, mock_upstream
):
    # Only a tool's `parameters` or a response format's `schema` are JSON Schemas; a
    # key named "properties" (or "schema", "parameters") elsewhere is plain data and
    # gets no exemption.
    model = make_model()
    issued = make_key()
    url = canary.urls[0]
    hello = {"role": "user", "content": "Hello"}
    cases = [
        ("metadata", {"metadata": {"properties": {"api_base": url}}}),
        ("metadata", {"metadata": {"schema": {"base_url": url}}}),
        ("metadata", {"metadata": {"parameters": {"api_key": "sk-attacker"}}}),
        ("messages", {"messages": [{**hello, "properties": {"api_base": url}}]}),
    ]

    def check(case: tuple[str, dict]) -> None:
        parent, extra = case
        body = {"model": model.name, "messages": [hello], **extra}
        response = chat(live_gateway.v1, issued.secret, body)
        error = assert_openai_error(response, 400, code="forbidden_parameter")
        assert str(error["param"]).startswith(parent), error

    try:
        check_each(cases, check)
    finally:
        assert settle_and_count(canary) == 0
    assert mock_upstream.calls(model.name) == 0


def test_it_refuses_overrides_on_the_embeddings_endpoint(
    live_gateway, make_model, make_key, canary
):
    model = make_model(name="embed-ssrf-check")
    issued = make_key()

    responses = [
        httpx.post(
            f"{live_gateway.v1}/embeddings",
            json={"model": model.name, "input": "hi", "api_base": url},
            headers={"authorization": f"Bearer {issued.secret}"},
            timeout=30,
        )
        for url in canary.urls
    ]

    assert settle_and_count(canary) == 0
    for response in responses:
        assert_forbidden(response, "api_base", "api_base")


def test_it_refuses_overrides_sent_through_the_sdk_extra_body(
    live_gateway, make_model, make_key, canary, mock_upstream
):
    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    def check(case: tuple[str, str]) -> None:
        name, value = case
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=model.name,
                messages=[{"role": "user", "content": "Hello"}],
                extra_body={name: value},
            )
        with pytest.raises(openai.BadRequestError) as nested:
            client.chat.completions.create(
                model=model.name,
                messages=[{"role": "user", "content": "Hello"}],
                extra_body={"metadata": {name: value}},
            )
        assert caught.value.code == "forbidden_parameter"
        assert caught.value.param == name
        assert nested.value.code == "forbidden_parameter"
        assert str(nested.value.param).startswith("metadata")
        assert str(nested.value.param).endswith(name)

    check_each(
        [(name, url) for name in ("api_base", "base_url") for url in canary.urls]
        + [("api_key", "sk-attacker"), ("custom_llm_provider", "openai")],
        check,
    )
    assert settle_and_count(canary) == 0
    assert mock_upstream.calls(model.name) == 0


def test_it_accepts_a_tool_schema_with_a_property_called_api_key(
    live_gateway, make_model, make_key, canary
):
    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)
    tool: ChatCompletionFunctionToolParam = {
        "type": "function",
        "function": {
            "name": "store_credentials",
            "parameters": {
                "type": "object",
                "properties": {
                    "api_key": {"type": "string"},
                    "api_base": {"type": "string", "format": "uri"},
                },
                "required": ["api_key", "api_base"],
            },
        },
    }

    reply = client.chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "Save my key"}],
        tools=[tool],
    )

    call = first_tool_call(reply)
    assert call.function.name == "store_credentials"
    assert json.loads(call.function.arguments) == {
        "api_key": "mock",
        "api_base": "https://example.com/mock",
    }
    assert settle_and_count(canary) == 0


def test_it_accepts_a_response_schema_with_a_property_called_api_key(
    live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)
    schema = {
        "type": "object",
        "properties": {"api_key": {"type": "string"}},
        "required": ["api_key"],
        "additionalProperties": False,
    }

    reply = client.chat.completions.create(
        model=model.name,
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "creds", "schema": schema, "strict": True},
        },
    )

    assert json.loads(content_of(reply)) == {"api_key": "mock"}
