"""Every failure on /v1 is an OpenAI-shaped JSON error with the right status and code."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.support.http import assert_openai_error, chat, check_each, unique

pytestmark = pytest.mark.e2e

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


def body_for(model_name: str, **extra: object) -> dict:
    return {"model": model_name, "messages": HELLO, **extra}


# --- authentication ----------------------------------------------------------------------


def test_it_refuses_a_request_without_a_key(live_gateway, make_model):
    model = make_model()

    response = chat(live_gateway.v1, None, body_for(model.name))

    assert_openai_error(response, 401, code="missing_api_key", type="invalid_request_error")


def test_it_refuses_an_unknown_key(live_gateway, make_model, make_key, mock_upstream):
    model = make_model()
    real = make_key().secret

    def check(secret: str) -> None:
        response = chat(live_gateway.v1, secret, body_for(model.name))
        assert_openai_error(response, 401, code="invalid_api_key")

    check_each(
        [
            "sk-gw-" + "A" * 43,
            "sk-not-a-gateway-key",
            "sk-gw-" + "x" * 300,
            real[:-1],
            real + "x",
            real.upper(),
        ],
        check,
    )
    assert mock_upstream.calls(model.name) == 0


def test_it_refuses_an_unknown_key_through_the_sdk(live_gateway, make_model):
    model = make_model()
    client = OpenAI(base_url=live_gateway.v1, api_key="sk-gw-" + "B" * 43, max_retries=0)

    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=model.name, messages=HELLO)

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_it_refuses_a_revoked_key(live_gateway, make_model, make_key):
    from accounts import services as account_services

    model = make_model()
    issued = make_key()
    account_services.key_revoke(key=issued.key)

    response = chat(live_gateway.v1, issued.secret, body_for(model.name))

    assert_openai_error(response, 401, code="invalid_api_key")
    assert "revoked" in response.json()["error"]["message"].lower()


def test_it_refuses_an_expired_key(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key(expires_at=timezone.now() - timedelta(minutes=1))

    response = chat(live_gateway.v1, issued.secret, body_for(model.name))

    assert_openai_error(response, 401, code="invalid_api_key")
    assert "expired" in response.json()["error"]["message"].lower()


# --- models ---------------------------------------------------------------------------------


def test_it_refuses_a_model_the_key_may_not_use(live_gateway, make_model, make_key, mock_upstream):
    allowed = make_model(name=unique("allowed"))
    forbidden = make_model(name=unique("forbidden"))
    issued = make_key(allowed_models=[allowed.name])

    response = chat(live_gateway.v1, issued.secret, body_for(forbidden.name))

    assert_openai_error(response, 403, code="model_not_allowed", type="permission_error")
    assert mock_upstream.calls(forbidden.name) == 0


def test_it_answers_404_for_an_unknown_model(live_gateway, make_key):
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(unique("no-such-model")))

    assert_openai_error(
        response, 404, code="model_not_found", param="model", type="invalid_request_error"
    )


def test_it_raises_the_sdk_not_found_error_for_an_unknown_model(live_gateway, make_key):
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=unique("no-such-model"), messages=HELLO)

    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


# --- bad requests -------------------------------------------------------------------------------


def test_it_names_an_unknown_parameter(live_gateway, make_model, make_key, mock_upstream):
    model = make_model()
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name, frobnicate=1))

    assert_openai_error(
        response, 400, code="unknown_parameter", param="frobnicate", type="invalid_request_error"
    )
    assert mock_upstream.calls(model.name) == 0


def test_it_names_an_unknown_parameter_sent_through_the_sdk_extra_body(
    live_gateway, make_model, make_key
):
    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model.name, messages=HELLO, extra_body={"top_k": 5})

    assert caught.value.status_code == 400
    assert caught.value.code == "unknown_parameter"
    assert caught.value.param == "top_k"


def test_it_refuses_a_bad_temperature(live_gateway, make_model, make_key, mock_upstream):
    model = make_model()
    issued = make_key()

    def check(temperature: object) -> None:
        response = chat(
            live_gateway.v1, issued.secret, body_for(model.name, temperature=temperature)
        )
        assert_openai_error(response, 400, type="invalid_request_error", param="temperature")

    check_each([3.5, -1, "hot", True, [1]], check)
    assert mock_upstream.calls(model.name) == 0


def test_it_refuses_missing_or_malformed_messages(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    def check(messages: object) -> None:
        body: dict = {"model": model.name}
        if messages is not None:
            body["messages"] = messages
        response = chat(live_gateway.v1, issued.secret, body)
        error = assert_openai_error(response, 400, type="invalid_request_error")
        assert str(error["param"]).startswith("messages"), error

    check_each([None, [], "Hello", [{"content": "no role"}], ["Hello"]], check)


def test_it_refuses_a_request_without_a_model(live_gateway, make_key):
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, {"messages": HELLO})

    assert_openai_error(response, 400, type="invalid_request_error", param="model")


def test_it_refuses_a_body_that_is_not_json(live_gateway, make_key):
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, b'{"model": "x", "messages": [')

    assert_openai_error(response, 400, type="invalid_request_error")


def test_it_refuses_a_body_that_is_not_an_object(live_gateway, make_key):
    issued = make_key()

    def check(body: bytes) -> None:
        assert_openai_error(chat(live_gateway.v1, issued.secret, body), 400)

    check_each([b"[1, 2, 3]", b'"a string"', b"42", b"null", b"true"], check)


def test_it_refuses_an_empty_body(live_gateway, make_key):
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, b"")

    assert_openai_error(response, 400, type="invalid_request_error")


def test_it_refuses_stream_options_without_stream(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()

    response = chat(
        live_gateway.v1,
        issued.secret,
        body_for(model.name, stream_options={"include_usage": True}),
    )

    assert_openai_error(response, 400, param="stream_options")


def _oversized_body(model_name: str) -> bytes:
    padding = "x" * (8 * 1024 * 1024 + 1)
    return json.dumps(
        {"model": model_name, "messages": [{"role": "user", "content": padding}]}
    ).encode()


def test_it_refuses_a_body_over_the_size_limit_with_413(
    live_gateway, make_model, make_key, mock_upstream
):
    model = make_model()
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, _oversized_body(model.name))

    assert_openai_error(response, 413, code="request_too_large", type="invalid_request_error")
    assert mock_upstream.calls(model.name) == 0


def test_it_refuses_a_chunked_body_over_the_size_limit_with_413(
    live_gateway, make_model, make_key, mock_upstream
):
    model = make_model()
    issued = make_key()
    payload = _oversized_body(model.name)

    def pieces():
        # No Content-Length: the limit must hold for chunked uploads too.
        for start in range(0, len(payload), 1024 * 1024):
            yield payload[start : start + 1024 * 1024]

    response = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        content=pieces(),
        headers={"authorization": f"Bearer {issued.secret}", "content-type": "application/json"},
        timeout=60,
    )

    assert_openai_error(response, 413, code="request_too_large")
    assert mock_upstream.calls(model.name) == 0


# --- upstream failures ----------------------------------------------------------------------------


def faulty_model(make_model, control: str, **fields):
    from gateway import services

    name = unique("faulty")
    upstream = f"{name};{control}"
    model = make_model(name=name, provider_model=f"openai/{upstream}", **fields)
    # One attempt: these tests are about how a failure is shown, not about retries
    # (which would only repeat the same failure, after a backoff).
    services.group_save(name=name, num_retries=0)
    return model, upstream


def test_it_maps_a_provider_500_to_502(live_gateway, make_model, make_key, mock_upstream):
    model, upstream = faulty_model(make_model, "status=500")
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name))

    assert_openai_error(response, 502, code="upstream_error")
    assert mock_upstream.calls(upstream) == 1


def test_it_maps_a_provider_429_to_503_with_retry_after(
    live_gateway, make_model, make_key, mock_upstream
):
    model, upstream = faulty_model(make_model, "status=429;retry_after=2")
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name))

    assert_openai_error(response, 503, code="upstream_rate_limited")
    assert response.headers.get("retry-after") == "2"
    assert mock_upstream.calls(upstream) == 1


def test_it_maps_a_provider_503_to_503(live_gateway, make_model, make_key, mock_upstream):
    model, upstream = faulty_model(make_model, "status=503")
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name))

    assert_openai_error(response, 503)
    assert mock_upstream.calls(upstream) == 1


def test_it_maps_a_provider_timeout_to_504(live_gateway, make_model, make_key, mock_upstream):
    model, upstream = faulty_model(make_model, "timeout=1", timeout_seconds=1.0)
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name))

    assert_openai_error(response, 504, code="upstream_timeout")
    assert response.elapsed.total_seconds() < 10
    assert mock_upstream.calls(upstream) == 1


def test_it_maps_a_provider_timeout_on_a_stream_to_504(live_gateway, make_model, make_key):
    model, _ = faulty_model(make_model, "timeout=1", timeout_seconds=1.0)
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name, stream=True))

    assert_openai_error(response, 504, code="upstream_timeout")


def test_it_hides_the_provider_message_and_credentials_on_a_provider_401(
    live_gateway, make_model, make_key, mock_upstream
):
    provider_secret = f"sk-provider-secret-{unique('cred')}"
    model, upstream = faulty_model(make_model, "status=401", api_key=provider_secret)
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name))

    assert_openai_error(response, 502, code="upstream_auth_error")
    assert mock_upstream.calls(upstream) == 1
    assert provider_secret not in response.text
    # The mock's own wording for the injected 401 must not leak through.
    assert "Mock upstream injected" not in response.text
    assert upstream not in response.text
    assert mock_upstream.url not in response.text
    assert provider_secret not in live_gateway.log()


def test_it_answers_a_provider_error_before_a_stream_as_json(live_gateway, make_model, make_key):
    model, _ = faulty_model(make_model, "status=500")
    issued = make_key()

    response = chat(live_gateway.v1, issued.secret, body_for(model.name, stream=True))

    assert_openai_error(response, 502, code="upstream_error")


def test_it_raises_the_sdk_errors_for_provider_failures(live_gateway, make_model, make_key):
    failing, _ = faulty_model(make_model, "status=500")
    limited, _ = faulty_model(make_model, "status=429;retry_after=1")
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    with pytest.raises(openai.InternalServerError) as server_error:
        client.chat.completions.create(model=failing.name, messages=HELLO)
    with pytest.raises(openai.APIStatusError) as rate_limited:
        client.chat.completions.create(model=limited.name, messages=HELLO)

    assert server_error.value.status_code == 502
    assert server_error.value.code == "upstream_error"
    assert rate_limited.value.status_code == 503
    assert rate_limited.value.code == "upstream_rate_limited"


# --- routes and request ids -----------------------------------------------------------------------


def test_it_answers_an_unknown_v1_route_with_a_json_404(live_gateway, make_key):
    auth = {"authorization": f"Bearer {make_key().secret}"}

    def check(case: tuple[str, str]) -> None:
        method, path = case
        response = httpx.request(method, f"{live_gateway.url}{path}", json={}, headers=auth)
        assert_openai_error(response, 404)

    check_each(
        [
            (method, path)
            for path in ("/v1/nope", "/v1/chat/complete", "/v1/models-list", "/v1/", "/v1")
            for method in ("GET", "POST")
        ]
        + [("POST", "/v1/chat/completions/extra")],
        check,
    )


def test_it_answers_a_wrong_method_with_a_json_405(live_gateway, make_key):
    auth = {"authorization": f"Bearer {make_key().secret}"}

    def check(case: tuple[str, str]) -> None:
        method, path = case
        response = httpx.request(method, f"{live_gateway.url}{path}", headers=auth)
        assert_openai_error(response, 405)

    check_each(
        [
            ("GET", "/v1/chat/completions"),
            ("DELETE", "/v1/chat/completions"),
            ("PUT", "/v1/chat/completions"),
            ("GET", "/v1/embeddings"),
            ("POST", "/v1/models"),
            ("DELETE", "/v1/models/anything"),
        ],
        check,
    )


def test_every_response_carries_a_request_id(live_gateway, make_model, make_key):
    model = make_model()
    issued = make_key()
    auth = {"authorization": f"Bearer {issued.secret}"}
    admin = live_gateway.admin()

    responses = [
        chat(live_gateway.v1, issued.secret, body_for(model.name)),
        chat(live_gateway.v1, None, body_for(model.name)),
        chat(live_gateway.v1, issued.secret, b"not json"),
        httpx.get(f"{live_gateway.v1}/models", headers=auth),
        httpx.get(f"{live_gateway.v1}/does-not-exist", headers=auth),
        httpx.get(f"{live_gateway.url}/health/live"),
        httpx.get(f"{live_gateway.url}/health/ready"),
        httpx.get(f"{live_gateway.url}/api/openapi.json"),
        admin.get("/models"),
        admin.get("/teams/999999999"),
        httpx.get(f"{live_gateway.url}/api/admin/models"),
    ]

    request_ids = [response.headers.get("x-request-id") for response in responses]
    assert all(request_ids), list(zip([r.request.url for r in responses], request_ids, strict=True))
    assert len(set(request_ids)) == len(request_ids)
