"""Unit tests of request validation (gateway/validation.py): no server, no database.

The live tests (test_errors_e2e.py, proofs/test_fuzz.py) prove the HTTP side; these pin
down each rule's exact answer, fast.
"""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import GatewayError
from gateway.validation import (
    Parsed,
    find_forbidden,
    find_remote_media,
    require_object,
    tags_from,
    validate_chat,
    validate_embeddings,
    validate_messages,
    validate_responses,
)

HELLO = [{"role": "user", "content": "Hello"}]


def refusal(validate: Any, body: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        validate(body)
    return caught.value


def test_it_parses_a_chat_request() -> None:
    body = {"model": "m", "messages": HELLO, "stream": True, "user": "u-1", "fallbacks": ["b"]}

    assert validate_chat(body) == Parsed(model="m", stream=True, end_user="u-1", fallbacks=("b",))


def test_it_reads_models_as_an_ordered_list_that_includes_the_requested_model() -> None:
    body = {"models": ["a", "b", "c"], "messages": HELLO}

    assert validate_chat(body) == Parsed(model="a", stream=False, fallbacks=("b", "c"))
    assert body["model"] == "a"


def test_it_names_an_unknown_parameter() -> None:
    error = refusal(validate_chat, {"model": "m", "messages": HELLO, "temprature": 1})

    assert (error.status, error.type) == (400, "invalid_request_error")
    assert (error.code, error.param) == ("unknown_parameter", "temprature")


def test_it_refuses_a_routing_override_at_any_depth_and_names_its_path() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"API_BASE": "x"}]}]}

    error = refusal(validate_chat, body)

    assert (error.status, error.code) == (400, "forbidden_parameter")
    assert error.param == "messages[0].content[0].API_BASE"


def test_it_allows_an_override_name_inside_a_clients_json_schema() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"api_key": {}}}}

    assert find_forbidden({"tools": [tool]}) is None
    assert find_forbidden({"tools": [{"function": {"api_key": 1}}]}) == "tools[0].function.api_key"


def test_it_refuses_a_body_nested_deeper_than_64_levels() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(70):
        node["a"] = {}
        node = node["a"]

    with pytest.raises(GatewayError) as caught:
        find_forbidden(deep)

    assert (caught.value.status, caught.value.code) == (400, "too_deeply_nested")
    assert caught.value.param == "a.a.a…"


def test_it_finds_a_remote_url_in_a_media_part_but_not_in_text_or_data_urls() -> None:
    image = {"type": "image_url", "image_url": {"url": " HTTP://169.254.169.254/x"}}
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    text = {"type": "text", "text": "see https://example.com"}

    assert find_remote_media({"messages": [{"content": [text, image]}]}) == (
        "messages[0].content[1].image_url.url"
    )
    assert find_remote_media({"messages": [{"content": [text, inline]}]}) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.01),
        ("temperature", True),
        ("top_p", -0.1),
        ("n", 129),
        ("n", 1.0),
        ("max_tokens", 0),
        ("stream", "yes"),
        ("user", "a\x00b"),
        ("tools", {"type": "function"}),
    ],
)
def test_it_refuses_an_out_of_range_chat_parameter_and_names_it(field: str, value: Any) -> None:
    error = refusal(validate_chat, {"model": "m", "messages": HELLO, field: value})

    assert (error.status, error.param) == (400, field)


def test_it_accepts_the_bounds_of_each_range() -> None:
    body = {"model": "m", "messages": HELLO, "temperature": 2, "top_p": 0, "n": 128}

    assert validate_chat(body).model == "m"


def test_it_refuses_stream_options_without_stream() -> None:
    body = {"model": "m", "messages": HELLO, "stream_options": {"include_usage": True}}

    assert refusal(validate_chat, body).param == "stream_options"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": " ", "messages": HELLO}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"content": "no role"}]}, "messages[0]"),
    ],
)
def test_it_names_what_is_missing_from_a_chat_request(body: dict[str, Any], param: str) -> None:
    assert refusal(validate_chat, body).param == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"service_tier": "priority"}, "service_tier"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_it_refuses_what_the_ledger_cannot_price(extra: dict[str, Any], param: str) -> None:
    error = refusal(validate_chat, {"model": "m", "messages": HELLO, **extra})

    assert (error.status, error.code, error.param) == (400, "unpriced_feature", param)


def test_it_accepts_the_list_price_service_tiers() -> None:
    for tier in ("auto", "default"):
        assert validate_chat({"model": "m", "messages": HELLO, "service_tier": tier}).model == "m"


def test_it_requires_max_tokens_and_user_or_assistant_roles_on_messages() -> None:
    missing = refusal(validate_messages, {"model": "m", "messages": HELLO})
    system = refusal(
        validate_messages,
        {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
    )

    assert (missing.status, missing.param) == (400, "max_tokens")
    assert (system.status, system.param) == (400, "messages.0.role")


def test_it_reads_the_end_user_of_a_messages_request_from_its_metadata() -> None:
    body = {"model": "m", "max_tokens": 5, "messages": HELLO, "metadata": {"user_id": "u-9"}}

    assert validate_messages(body) == Parsed(model="m", stream=False, end_user="u-9")


def test_it_requires_input_on_responses_and_embeddings() -> None:
    assert refusal(validate_responses, {"model": "m", "input": []}).param == "input"
    assert refusal(validate_embeddings, {"model": "m", "input": ""}).param == "input"
    assert refusal(
        validate_embeddings, {"model": "m", "input": "x", "encoding_format": "int8"}
    ).param == ("encoding_format")
    assert validate_embeddings({"model": "m", "input": ["x"]}) == Parsed("m", False)


def test_it_merges_header_and_metadata_tags_without_duplicates() -> None:
    assert tags_from(" a, b ,,", {"tags": ["b", " c "]}) == ["a", "b", "c"]
    assert tags_from(None, None) == []


def test_it_refuses_more_than_20_tags_or_a_tag_longer_than_64() -> None:
    too_many = ",".join(f"t{i}" for i in range(21))

    with pytest.raises(GatewayError) as many:
        tags_from(too_many, None)
    with pytest.raises(GatewayError) as long:
        tags_from(None, {"tags": ["x" * 65]})

    assert (many.value.status, many.value.param) == (400, "metadata.tags")
    assert (long.value.status, long.value.param) == (400, "metadata.tags")


def test_it_refuses_a_body_that_is_not_an_object() -> None:
    error = refusal(require_object, ["model", "m"])

    assert (error.status, error.code) == (400, "invalid_json")
    assert require_object({"a": 1}) == {"a": 1}
