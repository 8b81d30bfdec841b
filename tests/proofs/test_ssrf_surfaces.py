"""Promise 7: nothing a client sends, and no redirect a provider answers with, makes the
gateway connect somewhere an admin did not configure.

Overrides in the body are tests/gateway/test_ssrf_e2e.py. Here: the query string and
headers (every spelling of an API base, provider or organisation override), pointing
at loopback in each form and at a redirector that bounces to loopback; a deployment
whose own api_base redirects; and image URLs inside messages. A canary listener on
127.0.0.1 and ::1 counts every connection: it must count none.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.support.listeners import Canary, Redirector

pytestmark = pytest.mark.e2e

CLAUDE = "claude-3-5-haiku-20241022"
QUERY_OVERRIDES = ("api_base", "base_url", "api-base", "apiBase", "url", "endpoint", "host")
HEADER_OVERRIDES = (
    "x-api-base",
    "api-base",
    "api_base",
    "x-base-url",
    "base-url",
    "x-litellm-api-base",
    "litellm-api-base",
    "openai-base-url",
    "anthropic-base-url",
    "azure-endpoint",
    "x-forwarded-host",
    "x-original-url",
    "x-rewrite-url",
    "forwarded",
)


def targets(canary: Canary, redirector: Redirector) -> list[str]:
    return [f"http://{host}/v1" for host in canary.hosts] + [f"{redirector.url}/v1"]


def header_values(target: str) -> dict[str, str]:
    host = target.split("//", 1)[1].split("/", 1)[0]
    values = {name: target for name in HEADER_OVERRIDES}
    values.update(
        {
            "x-forwarded-host": host,
            "forwarded": f"host={host};proto=http",
            # Provider and organisation overrides ride along with the base.
            "custom_llm_provider": "openai",
            "custom-llm-provider": "openai",
            "x-custom-llm-provider": "openai",
            "openai-organization": "org-attacker",
            "openai-project": "proj-attacker",
            "x-api-version": "2099-01-01",
        }
    )
    return values


def query_values(target: str) -> dict[str, str]:
    values = dict.fromkeys(QUERY_OVERRIDES, target)
    values.update({"custom_llm_provider": "openai", "api_key": "sk-attacker", "organization": "x"})
    return values


def calls(gateway: Any, openai_model: Any, claude_model: Any) -> list[tuple[str, str, dict]]:
    """(label, path, body) for every data-plane route that reaches a provider."""
    hello = [{"role": "user", "content": "Hello"}]
    return [
        ("chat", "/chat/completions", {"model": openai_model.name, "messages": hello}),
        (
            "chat stream",
            "/chat/completions",
            {"model": openai_model.name, "messages": hello, "stream": True},
        ),
        ("chat via litellm", "/chat/completions", {"model": claude_model.name, "messages": hello}),
        (
            "messages",
            "/messages",
            {"model": claude_model.name, "messages": hello, "max_tokens": 50},
        ),
        (
            "messages via litellm",
            "/messages",
            {"model": openai_model.name, "messages": hello, "max_tokens": 50},
        ),
        ("count tokens", "/messages/count_tokens", {"model": claude_model.name, "messages": hello}),
        ("responses", "/responses", {"model": openai_model.name, "input": "Hello"}),
        ("completions", "/completions", {"model": openai_model.name, "prompt": "Hello"}),
        ("embeddings", "/embeddings", {"model": openai_model.name, "input": "Hello"}),
    ]


@pytest.fixture
def models(make_model: Any, mock_upstream: Any) -> tuple[Any, Any]:
    tag = uuid.uuid4().hex[:10]
    gpt = make_model(name=f"ssrf-gpt-{tag}", provider_model=f"openai/ssrf-{tag}")
    claude = make_model(
        name=f"ssrf-claude-{tag}",
        provider_model=f"anthropic/{CLAUDE};id={tag}",
        api_base=mock_upstream.url,
    )
    return gpt, claude


def send(gateway: Any, secret: str, path: str, body: dict, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}", **kwargs.pop("headers", {})}
    return httpx.post(f"{gateway.v1}{path}", json=body, headers=headers, timeout=30, **kwargs)


def test_overrides_in_the_query_string_and_headers_never_reach_a_listener(
    live_gateway, make_key, models, canary, redirector
):
    gpt, claude = models
    secret = make_key().secret
    requests: list[tuple[str, str, dict, dict[str, str]]] = []  # label, path, body, headers
    for target in targets(canary, redirector):
        for label, path, body in calls(live_gateway, gpt, claude):
            query = urlencode(query_values(target))
            requests.append((f"{label} ?{target}", f"{path}?{query}", body, {}))
            requests.append((f"{label} headers {target}", path, body, header_values(target)))
        # One override at a time too, so a refusal of one cannot hide another.
        _, path, body = calls(live_gateway, gpt, claude)[0]
        for name, value in query_values(target).items():
            requests.append((f"?{name}={value}", f"{path}?{urlencode({name: value})}", body, {}))
        for name, value in header_values(target).items():
            requests.append((f"{name}: {value}", path, body, {name: value}))

    def run(request: tuple[str, str, dict, dict[str, str]]) -> str | None:
        label, path, body, headers = request
        response = send(live_gateway, secret, path, body, headers=headers)
        # Served by the configured deployment, or refused: never anything else.
        if response.status_code not in (200, 400):
            return f"{label}: {response.status_code} {response.text[:200]}"
        return None

    with ThreadPoolExecutor(8) as pool:
        outcomes = [found for found in pool.map(run, requests) if found]

    assert canary.settled_count() == 0
    assert redirector.count() == 0
    assert outcomes == []


def _redirecting(make_model: Any, redirector: Redirector) -> tuple[Any, Any]:
    from gateway import services

    tag = uuid.uuid4().hex[:10]
    gpt = make_model(
        name=f"bounce-gpt-{tag}", provider_model=f"openai/b-{tag}", api_base=f"{redirector.url}/v1"
    )
    claude = make_model(
        name=f"bounce-claude-{tag}",
        provider_model=f"anthropic/{CLAUDE};id={tag}",
        api_base=redirector.url,
    )
    for model in (gpt, claude):
        services.group_save(name=model.name, num_retries=0)
    return gpt, claude


@pytest.mark.parametrize(
    "label",
    [
        "chat",
        "chat via litellm",
        "messages",
        "messages via litellm",
        "responses",
        "completions",
        "embeddings",
    ],
)
def test_a_provider_redirect_is_never_followed_and_answers_502(
    live_gateway, make_key, make_model, canary, redirector, label
):
    gpt, claude = _redirecting(make_model, redirector)
    [(_, path, body)] = [c for c in calls(live_gateway, gpt, claude) if c[0] == label]

    response = send(live_gateway, make_key().secret, path, body)

    answer = (response.status_code, response.text[:300])
    assert redirector.count() >= 1, f"the gateway never called the deployment: {answer}"
    assert canary.settled_count() == 0, f"the gateway followed the provider's redirect: {answer}"
    assert response.status_code == 502, answer


def test_a_provider_redirect_on_a_stream_is_never_followed_and_answers_502(
    live_gateway, make_key, make_model, canary, redirector
):
    gpt, _ = _redirecting(make_model, redirector)
    body = {"model": gpt.name, "messages": [{"role": "user", "content": "Hello"}], "stream": True}

    with httpx.stream(
        "POST",
        f"{live_gateway.v1}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {make_key().secret}"},
        timeout=30,
    ) as response:
        text = response.read().decode()

    answer = (response.status_code, response.headers.get("content-type"), text[:300])
    assert redirector.count() >= 1, f"the gateway never called the deployment: {answer}"
    assert canary.settled_count() == 0, f"the gateway followed the provider's redirect: {answer}"
    # Nothing was streamed yet: like any provider error before a stream, a JSON 502.
    assert response.status_code == 502, answer


def test_token_counting_through_count_tokens_never_follows_a_redirect(
    live_gateway, make_key, make_model, canary, redirector
):
    _, claude = _redirecting(make_model, redirector)
    response = send(
        live_gateway,
        make_key().secret,
        "/messages/count_tokens",
        {"model": claude.name, "messages": [{"role": "user", "content": "Hello"}]},
    )
    assert redirector.count() >= 1
    assert canary.settled_count() == 0
    # The provider's count failed, so the gateway counts locally.
    assert response.status_code == 200 and response.json()["input_tokens"] > 0, response.text


def image_bodies(canary: Canary, gpt: Any, claude: Any) -> list[tuple[str, str, Any, dict]]:
    url = f"http://127.0.0.1:{canary.port}/x.png"
    chat_image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    messages_image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image", "source": {"type": "url", "url": url}},
            ],
        }
    ]
    responses_image = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this picture?"},
                {"type": "input_image", "image_url": url},
            ],
        }
    ]
    return [
        ("chat", "/chat/completions", gpt, {"model": gpt.name, "messages": chat_image}),
        (
            "chat stream",
            "/chat/completions",
            gpt,
            {"model": gpt.name, "messages": chat_image, "stream": True},
        ),
        ("responses", "/responses", gpt, {"model": gpt.name, "input": responses_image}),
        (
            "messages to an openai deployment",
            "/messages",
            gpt,
            {"model": gpt.name, "messages": messages_image, "max_tokens": 50},
        ),
        (
            "count tokens on an openai deployment",
            "/messages/count_tokens",
            gpt,
            {"model": gpt.name, "messages": messages_image},
        ),
        (
            "messages to an anthropic deployment",
            "/messages",
            claude,
            {"model": claude.name, "messages": messages_image, "max_tokens": 50},
        ),
    ]


def test_image_urls_in_messages_are_never_fetched_by_the_gateway(
    live_gateway, make_key, models, canary
):
    gpt, claude = models
    secret = make_key().secret
    failures = []

    for label, path, _, body in image_bodies(canary, gpt, claude):
        response = send(live_gateway, secret, path, body)
        if response.status_code != 200:
            failures.append(f"{label}: {response.status_code} {response.text[:200]}")
        if canary.settled_count():
            failures.append(f"{label}: the canary was fetched")
            break

    assert canary.settled_count() == 0
    assert failures == []


def test_an_image_url_sent_to_an_anthropic_deployment_through_chat_is_never_fetched(
    live_gateway, make_key, models, canary
):
    """litellm translates chat to Anthropic's dialect; it must not download the image."""
    _, claude = models
    url = f"http://127.0.0.1:{canary.port}/x.png"
    body = {
        "model": claude.name,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }

    response = send(live_gateway, make_key().secret, "/chat/completions", body)

    assert canary.settled_count() == 0, (
        f"the gateway fetched a client-supplied image URL ({response.status_code})"
    )
