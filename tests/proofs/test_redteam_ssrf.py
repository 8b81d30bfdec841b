"""Red team, issue #12 items 14 and 15: the gateway fetches no client-supplied URL, and an
admin's api_base cannot point it at cloud metadata or link-local addresses.

Item 14. litellm refuses to fetch loopback, so a canary on 127.0.0.1 proves nothing. Here
the gateway subprocess gets a `sitecustomize` (written by the test) that resolves a
public-looking host name to a public address and quietly connects that address to the
loopback canary: exactly what a real CDN name would do, as far as litellm can tell. A
positive control (a deployment whose api_base is that name) shows the mapping really
reaches the canary from inside the gateway, so a count of 0 elsewhere means something.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.listeners import Canary
from tests.support.live import LiveGateway, gateway_env, start_gateway, stop_process

pytestmark = pytest.mark.e2e

CLAUDE = "claude-3-5-haiku-20241022"
# A name and address litellm's own SSRF check considers public (ip.is_global).
CDN = "images.public-cdn.example.com"
PUBLIC_IP = "93.184.215.14"

SITECUSTOMIZE = '''
"""Test-only DNS for the gateway process: one public-looking name resolves to a public
address, and connecting to that address lands on loopback (the test's canary)."""
import os
import socket

_NAME = os.environ.get("SSRF_TEST_NAME", "")
_PUBLIC = os.environ.get("SSRF_TEST_PUBLIC_IP", "")
if _NAME and _PUBLIC:
    _getaddrinfo = socket.getaddrinfo

    def _resolve(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name and name.lower().rstrip(".") == _NAME:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (_PUBLIC, int(port or 0)))]
        return _getaddrinfo(host, port, family, type, proto, flags)

    socket.getaddrinfo = _resolve
    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _local(address):
        if isinstance(address, tuple) and address and address[0] == _PUBLIC:
            return ("127.0.0.1", address[1])
        return address

    socket.socket.connect = lambda self, address: _connect(self, _local(address))
    socket.socket.connect_ex = lambda self, address: _connect_ex(self, _local(address))
'''


@pytest.fixture(scope="module")
def cdn_gateway(
    live_gateway: LiveGateway,
    services_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveGateway]:
    """A gateway process in which CDN resolves to PUBLIC_IP, which connects to loopback.

    One per module (starting a gateway costs seconds); it shares the test database and
    picks up each test's models at once, like the session's live gateway."""
    folder = tmp_path_factory.mktemp("cdn-gateway")
    site = folder / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = gateway_env(
        services_env, PYTHONPATH=path, SSRF_TEST_NAME=CDN, SSRF_TEST_PUBLIC_IP=PUBLIC_IP
    )
    gateway = start_gateway(env, folder / "gateway.log")
    try:
        yield gateway
    finally:
        stop_process(gateway.process)


@pytest.fixture
def deployments(make_model: Any, mock_upstream: Any) -> Iterator[dict[str, Any]]:
    tag = uuid.uuid4().hex[:10]
    yield {
        "openai": make_model(name=f"img-gpt-{tag}", provider_model=f"openai/img-{tag}"),
        "anthropic": make_model(
            name=f"img-claude-{tag}",
            provider_model=f"anthropic/{CLAUDE};id={tag}",
            api_base=mock_upstream.url,
        ),
        # litellm translates to Gemini's dialect (and downloads images to inline them)
        # before any request leaves, so the mock need not speak Gemini.
        "gemini": make_model(
            name=f"img-gemini-{tag}",
            provider_model="gemini/gemini-1.5-flash",
            api_base=mock_upstream.url,
        ),
    }


def image_url(canary: Canary, name: str = "cat.png") -> str:
    return f"http://{CDN}:{canary.port}/{name}"


def send(gateway: Any, secret: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{gateway.v1}{path}",
        json=body,
        headers={"authorization": f"Bearer {secret}"},
        timeout=60,
    )


def chat_image(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def messages_image(url: str, kind: str = "image") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": kind, "source": {"type": "url", "url": url}},
            ],
        }
    ]


def responses_image(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this picture?"},
                {"type": "input_image", "image_url": url},
            ],
        }
    ]


def test_the_public_looking_name_really_reaches_the_canary_from_inside_the_gateway(
    cdn_gateway, make_key, make_model, canary
):
    """Positive control: without it, a count of 0 below could mean the trap is broken.

    An admin's api_base at the public address is connected to, and lands on the canary.
    (litellm's URL check resolves CDN through socket.getaddrinfo, which the same file
    overrides; the failures of the tests below before the fix showed that half.)"""
    tag = uuid.uuid4().hex[:8]
    model = make_model(
        name=f"cdn-control-{tag}",
        provider_model=f"openai/c-{tag}",
        api_base=f"http://{PUBLIC_IP}:{canary.port}/v1",
    )
    send(
        cdn_gateway,
        make_key().secret,
        "/chat/completions",
        {"model": model.name, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert canary.settled_count() >= 1


def refused_cases(canary: Canary, models: dict[str, Any]) -> list[tuple[str, str, dict, str]]:
    """(label, path, body, the param the 400 must name) for every path where litellm
    would download a client's URL itself."""
    url = image_url(canary)
    claude, gemini = models["anthropic"].name, models["gemini"].name
    tool_result = [
        {"role": "user", "content": "look"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "look", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "image", "source": {"type": "url", "url": url}}],
                }
            ],
        },
    ]
    file_part = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Summarise"},
                {"type": "file", "file": {"file_id": image_url(canary, "report.pdf")}},
            ],
        }
    ]
    return [
        (
            "chat to anthropic",
            "/chat/completions",
            {"model": claude, "messages": chat_image(url)},
            "messages[0].content[1].image_url.url",
        ),
        (
            "chat stream to anthropic",
            "/chat/completions",
            {"model": claude, "messages": chat_image(url), "stream": True},
            "messages[0].content[1].image_url.url",
        ),
        (
            "chat to gemini",
            "/chat/completions",
            {"model": gemini, "messages": chat_image(url)},
            "messages[0].content[1].image_url.url",
        ),
        (
            "chat file to gemini",
            "/chat/completions",
            {"model": gemini, "messages": file_part},
            "messages[0].content[1].file.file_id",
        ),
        (
            "responses to anthropic",
            "/responses",
            {"model": claude, "input": responses_image(url)},
            "input[0].content[1].image_url",
        ),
        (
            "messages to gemini",
            "/messages",
            {"model": gemini, "messages": messages_image(url), "max_tokens": 50},
            "messages[0].content[1].source.url",
        ),
        (
            "messages document to gemini",
            "/messages",
            {"model": gemini, "messages": messages_image(url, "document"), "max_tokens": 50},
            "messages[0].content[1].source.url",
        ),
        (
            "messages tool result image to gemini",
            "/messages",
            {"model": gemini, "messages": tool_result, "max_tokens": 50},
            "messages[2].content[0].content[0].source.url",
        ),
    ]


@pytest.mark.parametrize(
    "label",
    [
        "chat to anthropic",
        "chat stream to anthropic",
        "chat to gemini",
        "chat file to gemini",
        "responses to anthropic",
        "messages to gemini",
        "messages document to gemini",
        "messages tool result image to gemini",
    ],
)
def test_a_url_the_gateway_would_have_to_download_is_refused_before_anything_runs(
    cdn_gateway, make_key, deployments, canary, label
):
    from billing.models import LedgerEntry

    [(_, path, body, param)] = [c for c in refused_cases(canary, deployments) if c[0] == label]
    key = make_key()

    response = send(cdn_gateway, key.secret, path, body)

    answer = (response.status_code, response.text[:300])
    assert canary.settled_count() == 0, f"the gateway downloaded the client's URL: {answer}"
    assert response.status_code == 400, answer
    error = response.json()["error"]
    if path == "/messages":
        assert response.json()["type"] == "error"
        assert param in error["message"], answer
    else:
        assert error["param"] == param, answer
        assert error["code"] == "remote_media_url", answer
    # Refused before admission: nothing was reserved, called or billed.
    assert not LedgerEntry.objects.filter(key_id=key.key.id).exists()


def test_urls_the_provider_fetches_itself_and_inline_data_still_work(
    cdn_gateway, make_key, deployments, canary, mock_upstream
):
    """Pass-through to a provider that speaks the client's dialect keeps the URL (the
    provider fetches it, not us); so does litellm's translation into OpenAI's dialect,
    which forwards image URLs untouched. An inline data: URL is fine everywhere."""
    url = image_url(canary)
    gpt, claude = deployments["openai"].name, deployments["anthropic"].name
    data_url = "data:image/png;base64,iVBORw0KGgo="
    allowed = [
        ("chat to openai", "/chat/completions", {"model": gpt, "messages": chat_image(url)}),
        ("responses to openai", "/responses", {"model": gpt, "input": responses_image(url)}),
        (
            "messages to anthropic",
            "/messages",
            {"model": claude, "messages": messages_image(url), "max_tokens": 50},
        ),
        (
            "messages to openai",
            "/messages",
            {"model": gpt, "messages": messages_image(url), "max_tokens": 50},
        ),
        (
            "count tokens on openai",
            "/messages/count_tokens",
            {"model": gpt, "messages": messages_image(url)},
        ),
        (
            "inline image to anthropic through chat",
            "/chat/completions",
            {"model": claude, "messages": chat_image(data_url)},
        ),
    ]
    secret = make_key().secret
    failures = []
    for label, path, body in allowed:
        response = send(cdn_gateway, secret, path, body)
        if response.status_code != 200:
            failures.append(f"{label}: {response.status_code} {response.text[:200]}")
        if canary.settled_count():
            failures.append(f"{label}: the gateway fetched the image")
            break
    assert failures == []


def test_a_fallback_that_would_download_the_url_refuses_the_request_up_front(
    cdn_gateway, make_key, deployments, canary
):
    """The first model forwards URLs, but its fallback would download them: the promise
    must hold on every attempt, so the request is refused before the first one."""
    from gateway import services

    gpt, claude = deployments["openai"], deployments["anthropic"]
    services.group_save(name=gpt.name, fallbacks=[claude.name])
    body = {"model": gpt.name, "messages": chat_image(image_url(canary))}

    response = send(cdn_gateway, make_key().secret, "/chat/completions", body)

    assert canary.settled_count() == 0
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert claude.name in error["message"]


# --- item 15: an admin's api_base ----------------------------------------------------------

REFUSED_BASES = [
    "http://169.254.169.254/latest/meta-data",  # AWS/GCP/Azure metadata
    "http://169.254.10.20:8080/v1",  # any IPv4 link-local
    "http://[fe80::1]/v1",  # IPv6 link-local
    "http://[fd00:ec2::254]/v1",  # AWS metadata over IPv6
    "http://[::ffff:169.254.169.254]/v1",  # the same, IPv4-mapped
    "http://100.100.100.200/v1",  # Alibaba metadata
    "http://metadata.google.internal/computeMetadata/v1",
    "http://METADATA.google.internal./v1",  # case and trailing dot
    "http://metadata/v1",
    "http://instance-data/latest",
    "https://user:secret@api.openai.com/v1",  # user-info
    "https://api.openai.com@169.254.169.254/v1",  # user-info hiding the real host
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
]
ACCEPTED_BASES = [
    "http://10.0.0.5:8000/v1",
    "http://172.16.3.4/v1",
    "http://192.168.1.10:11434",
    "http://[fd12:3456::1]:8000/v1",
    "http://127.0.0.1:9/v1",
    "http://[::1]:9/v1",
    "http://localhost:8000/v1",
    "https://api.openai.com/v1",
]


def _model_body(api_base: str) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    return {"name": f"base-{tag}", "provider_model": f"openai/base-{tag}", "api_base": api_base}


def _names_api_base(response: httpx.Response) -> bool:
    error = response.json().get("error") or {}
    return error.get("param") == "api_base" or "api_base" in str(error.get("message"))


def test_the_admin_api_refuses_metadata_link_local_and_user_info_api_bases(live_gateway):
    from gateway.models import ModelDeployment

    existing = live_gateway.admin().post("/models", json=_model_body("http://10.1.2.3/v1"))
    assert existing.status_code == 201, existing.text
    failures = []
    with live_gateway.admin() as admin:
        for base in REFUSED_BASES:
            body = _model_body(base)
            created = admin.post("/models", json=body)
            if created.status_code != 400 or not _names_api_base(created):
                failures.append(f"create {base}: {created.status_code} {created.text[:200]}")
            if ModelDeployment.objects.filter(name=body["name"]).exists():
                failures.append(f"create {base}: a row was stored")
            patched = admin.patch(f"/models/{existing.json()['id']}", json={"api_base": base})
            if patched.status_code != 400 or not _names_api_base(patched):
                failures.append(f"update {base}: {patched.status_code} {patched.text[:200]}")
    assert failures == []
    stored = ModelDeployment.objects.get(public_id=existing.json()["id"])
    assert stored.api_base == "http://10.1.2.3/v1"


def test_private_ranges_loopback_and_public_hosts_stay_allowed(live_gateway):
    with live_gateway.admin() as admin:
        answers = {base: admin.post("/models", json=_model_body(base)) for base in ACCEPTED_BASES}
    refused = {b: (r.status_code, r.text[:200]) for b, r in answers.items() if r.status_code != 201}
    assert refused == {}


def test_the_dashboard_form_refuses_a_metadata_api_base(live_gateway):
    from django.contrib.auth.models import User

    from gateway.models import ModelDeployment
    from tests.support.dashboard import dashboard_login, dashboard_post

    password = f"pw-{uuid.uuid4().hex}"
    root = User.objects.create_superuser(f"root-{uuid.uuid4().hex[:8]}", "r@example.com", password)
    dashboard = dashboard_login(live_gateway.url, root.username, password)
    dashboard.get("/models/new/")
    for base in ("http://169.254.169.254/latest", "http://u:p@10.0.0.5/v1"):
        body = _model_body(base)
        response = dashboard_post(
            dashboard, "/models/new/", {**body, "weight": "1", "enabled": "on"}
        )
        assert response.status_code == 400, (base, response.status_code)
        assert "api_base" in response.text or "link-local" in response.text, base
        assert not ModelDeployment.objects.filter(name=body["name"]).exists(), base
    accepted = dashboard_post(
        dashboard, "/models/new/", {**_model_body("http://10.0.0.5/v1"), "weight": "1"}
    )
    assert accepted.status_code == 302, accepted.text[:300]


def test_an_allow_listed_exception_is_accepted_and_nothing_else(spawn_gateway):
    gateway = spawn_gateway(GATEWAY_API_BASE_ALLOW="169.254.10.0/24, metadata.google.internal")
    with gateway.admin() as admin:
        ok_range = admin.post("/models", json=_model_body("http://169.254.10.7:8000/v1"))
        ok_name = admin.post("/models", json=_model_body("http://metadata.google.internal/v1"))
        still_refused = admin.post("/models", json=_model_body("http://169.254.169.254/v1"))
        user_info = admin.post("/models", json=_model_body("http://u:p@169.254.10.7/v1"))
    assert ok_range.status_code == 201, ok_range.text
    assert ok_name.status_code == 201, ok_name.text
    assert still_refused.status_code == 400 and _names_api_base(still_refused)
    # The allow-list permits an address, never credentials in the URL.
    assert user_info.status_code == 400 and _names_api_base(user_info)


def test_a_metadata_api_base_stored_before_the_rule_is_never_called(
    live_gateway, make_key, make_model
):
    """A row saved before this rule existed (written here past the service, as an old
    release would have) is left out of the routing table: its model answers 404, and a
    model that also has a sound deployment is served by that one only."""
    from gateway import services
    from gateway.models import ModelDeployment

    tag = uuid.uuid4().hex[:8]
    lone = ModelDeployment.objects.create(
        name=f"legacy-{tag}", provider_model=f"openai/l-{tag}", api_base="http://169.254.169.254/v1"
    )
    sound = make_model(name=f"mixed-{tag}", provider_model=f"openai/m-{tag}")
    ModelDeployment.objects.create(
        name=sound.name, provider_model=f"openai/m-{tag}", api_base="http://169.254.169.254/v1"
    )
    services.config_version_bump()
    secret = make_key().secret
    hello = [{"role": "user", "content": "hi"}]

    refused = send(
        live_gateway, secret, "/chat/completions", {"model": lone.name, "messages": hello}
    )
    served = [
        send(live_gateway, secret, "/chat/completions", {"model": sound.name, "messages": hello})
        for _ in range(6)
    ]

    assert refused.status_code == 404, refused.text[:300]
    assert [r.status_code for r in served] == [200] * 6, [r.text[:200] for r in served]


@pytest.mark.parametrize(
    "value", ["169.254.0.0/33", "not a host!", "999.1.1.1", "http://x/", "-bad.example"]
)
def test_a_malformed_allow_list_stops_start_up(monkeypatch, value):
    from django.core.exceptions import ImproperlyConfigured

    from config.env import env_destinations

    monkeypatch.setenv("GATEWAY_API_BASE_ALLOW", f"10.0.0.0/8,{value}")
    with pytest.raises(ImproperlyConfigured, match="GATEWAY_API_BASE_ALLOW"):
        env_destinations("GATEWAY_API_BASE_ALLOW")
