"""Promise 10: no credential is readable in plaintext anywhere after it has been used.

Unique canary values are used as provider API keys (OpenAI and Anthropic dialects, a
key the provider refuses, a key changed by an update), as virtual-key secrets (live,
rotated, revoked, and an unknown one), and as webhook signing secrets, through a
representative flow: JSON and streamed calls on every endpoint, pass-through and
litellm paths, provider failures, idempotent and cached calls, a batch job run by a
Celery worker that then delivers a signed webhook. Afterwards a `pg_dump` of the
database, the gateway's log, the worker's log, every key and value in Redis (Celery
messages decoded), every response received and the dashboard's pages about these teams,
keys, models and webhooks must hold none of them.
(The narrower encryption/hashing checks are tests/gateway/test_secrets_at_rest.py.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from django.conf import settings
from django.test import override_settings

from tests.support.dashboard import dashboard_login
from tests.support.live import LiveGateway, gateway_env
from tests.support.waiting import wait_for
from tests.support.workers import WORKER_ENV, CeleryWorker, start_worker

pytestmark = pytest.mark.e2e

CLAUDE = "claude-3-5-haiku-20241022"


@pytest.fixture
def worker(
    live_gateway: LiveGateway, services_env: dict[str, str], tmp_path: Path
) -> Iterator[CeleryWorker]:
    """A worker on the default queue (batches) and webhooks', stopped when the test ends."""
    env = gateway_env(services_env, **WORKER_ENV)
    found = start_worker(env, tmp_path, "celery,webhooks")
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks", received
    finally:
        server.shutdown()
        server.server_close()


class Seen:
    """Everything the gateway sent back to us, to be searched afterwards."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, response: httpx.Response, label: str = "") -> httpx.Response:
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.texts.append(f"{label} {response.status_code}\n{headers}\n{response.text}")
        return response


def pg_dump_text() -> str:
    db: dict[str, Any] = settings.DATABASES["default"]
    binary = shutil.which("pg_dump", path=os.environ.get("PG_BIN_DIR")) or shutil.which("pg_dump")
    assert binary, "pg_dump is not installed"
    dumped = subprocess.run(
        [
            binary,
            "-h",
            str(db["HOST"]),
            "-p",
            str(db["PORT"]),
            "-U",
            str(db["USER"]),
            "-d",
            str(db["NAME"]),
            "--no-owner",
            "--no-privileges",
        ],
        env={**os.environ, "PGPASSWORD": str(db["PASSWORD"] or "")},
        capture_output=True,
        timeout=120,
        check=True,
    )
    return dumped.stdout.decode(errors="replace")


def redis_text(url: str) -> str:
    """Every key and value in Redis; Celery message bodies are base64-decoded too."""
    client: Any = redis.Redis.from_url(url)
    out: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[Any] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = [b"%s=%s" % kv for kv in client.hgetall(key).items()]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [repr(e).encode() for e in client.xrange(key)]
        out.append(key)
        out.extend(values)
    decoded = []
    for value in out:
        for candidate in _json_bodies(value):
            try:
                decoded.append(base64.b64decode(candidate))
            except ValueError:
                continue
    return b"\n".join(out + decoded).decode(errors="replace")


def _json_bodies(value: bytes) -> list[str]:
    """The `body` of kombu messages, possibly wrapped in the `unacked` [message, ...] list."""
    try:
        data = json.loads(value.split(b"=", 1)[-1] if value.startswith(b"unacked") else value)
    except ValueError:
        try:
            data = json.loads(value.split(b"=", 1)[-1])
        except ValueError:
            return []
    found = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("body"), str):
                found.append(item["body"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def fragments(secret: str, prefix_len: int) -> list[str]:
    """The secret, and a 16-character piece of its random part (catches partial copies)."""
    return [secret, secret[prefix_len : prefix_len + 16]]


def test_no_canary_secret_is_readable_anywhere_after_a_representative_flow(
    live_gateway, mock_upstream, make_team, worker, receiver, services_env
):
    from accounts import services as account_services
    from billing import webhooks

    hook_url, received = receiver
    tag = uuid.uuid4().hex[:10]
    provider = {
        name: f"sk-canary-provider-{uuid.uuid4()}" for name in ("gpt", "bad", "claude", "new")
    }
    seen = Seen()
    admin = live_gateway.admin()

    # --- configuration through the management API --------------------------------------------
    gpt = seen.add(
        admin.post(
            "/models",
            json={
                "name": f"canary-gpt-{tag}",
                "provider_model": f"openai/canary-{tag}",
                "api_base": mock_upstream.api_base,
                "api_key": provider["gpt"],
                "input_cost_per_million": "1",
                "output_cost_per_million": "2",
                # Its batch runs live on the worker (no beat here to poll a native one).
                "capabilities": {"native_batches": False},
            },
        ),
        "create gpt",
    ).json()
    bad = seen.add(
        admin.post(
            "/models",
            json={
                "name": f"canary-bad-{tag}",
                "provider_model": f"openai/canary-bad-{tag};status=401",
                "api_base": mock_upstream.api_base,
                "api_key": provider["bad"],
            },
        ),
        "create bad",
    ).json()
    claude = seen.add(
        admin.post(
            "/models",
            json={
                "name": f"canary-claude-{tag}",
                "provider_model": f"anthropic/{CLAUDE};id={tag}",
                "api_base": mock_upstream.url,
                "api_key": provider["claude"],
            },
        ),
        "create claude",
    ).json()
    seen.add(admin.put(f"/model-groups/{bad['name']}", json={"num_retries": 0}))
    # A credential changed by an update, then used.
    seen.add(admin.patch(f"/models/{gpt['id']}", json={"api_key": provider["new"]}), "rotate")
    team = make_team(name=f"canary-team-{tag}")
    main = account_services.key_create(team=team, name="main")
    revoked = account_services.key_create(team=team, name="revoked")
    rotated = account_services.key_create(team=team, name="rotated")
    renewed = account_services.key_rotate(key=rotated.key, grace_seconds=600)
    seen.add(admin.delete(f"/keys/{revoked.key.id}"), "revoke")
    unknown = f"sk-gw-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    with override_settings(GATEWAY_WEBHOOK_ALLOW_PRIVATE=True):
        hook = webhooks.endpoint_create(team_id=team.id, url=hook_url, events=["batch.completed"])
    # Created through the API, this endpoint's secret is shown once, in this one response.
    revealed = admin.post(f"/teams/{team.id}/webhooks", json={"url": "https://example.com/h"})
    assert revealed.status_code == 201, revealed.text
    api_hook_secret = revealed.json()["secret"]

    # --- the data plane -------------------------------------------------------------------------
    hello = [{"role": "user", "content": "Hello"}]
    v1 = httpx.Client(base_url=live_gateway.v1, timeout=30)
    bearer = {"authorization": f"Bearer {main.secret}"}
    calls: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/chat/completions", {"model": gpt["name"], "messages": hello}, bearer),
        ("/chat/completions", {"model": gpt["name"], "messages": hello, "stream": True}, bearer),
        ("/chat/completions", {"model": claude["name"], "messages": hello}, bearer),
        ("/chat/completions", {"model": claude["name"], "messages": hello, "stream": True}, bearer),
        (
            "/messages",
            {"model": claude["name"], "messages": hello, "max_tokens": 20},
            {"x-api-key": main.secret},
        ),
        (
            "/messages",
            {"model": claude["name"], "messages": hello, "max_tokens": 20, "stream": True},
            bearer,
        ),
        ("/messages", {"model": gpt["name"], "messages": hello, "max_tokens": 20}, bearer),
        ("/messages/count_tokens", {"model": claude["name"], "messages": hello}, bearer),
        ("/responses", {"model": gpt["name"], "input": "Hello"}, bearer),
        ("/responses", {"model": claude["name"], "input": "Hello"}, bearer),
        ("/completions", {"model": gpt["name"], "prompt": "Hello"}, bearer),
        ("/embeddings", {"model": gpt["name"], "input": "Hello"}, bearer),
        # The provider refuses its key: a 502 that must not echo anything.
        ("/chat/completions", {"model": bad["name"], "messages": hello}, bearer),
        ("/chat/completions", {"model": bad["name"], "messages": hello, "stream": True}, bearer),
        ("/responses", {"model": bad["name"], "input": "Hello"}, bearer),
        # Idempotent and cached calls keep copies of answers in Redis.
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {**bearer, "idempotency-key": tag},
        ),
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {**bearer, "idempotency-key": tag},
        ),
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {**bearer, "x-gateway-cache": "on"},
        ),
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {**bearer, "x-gateway-cache": "on"},
        ),
        # Refused credentials.
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {"authorization": f"Bearer {unknown}"},
        ),
        ("/chat/completions", {"model": gpt["name"], "messages": hello}, {"x-api-key": unknown}),
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {"authorization": f"Bearer {revoked.secret}"},
        ),
        # The old secret of a rotated key, inside its grace period, and the new one.
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {"authorization": f"Bearer {rotated.secret}"},
        ),
        (
            "/chat/completions",
            {"model": gpt["name"], "messages": hello},
            {"authorization": f"Bearer {renewed.secret}"},
        ),
    ]
    statuses = []
    for path, body, headers in calls:
        statuses.append(seen.add(v1.post(path, json=body, headers=headers), path).status_code)
    for path in ("/key", "/models", f"/models/{gpt['name']}"):
        seen.add(v1.get(path, headers=bearer), path)
    assert statuses.count(200) >= 17, list(zip([c[0] for c in calls], statuses, strict=True))
    assert statuses[12:15] == [502, 502, 502] and statuses[19:22] == [401, 401, 401], statuses

    # --- a batch job, run by the worker, that ends with a signed webhook --------------------------
    sdk = openai.OpenAI(base_url=live_gateway.v1, api_key=main.secret, max_retries=0)
    lines = b"".join(
        json.dumps(
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": gpt["name"], "messages": hello, "max_tokens": 10},
            }
        ).encode()
        + b"\n"
        for i in range(3)
    )
    uploaded = sdk.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(
        lambda: (b := sdk.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
        60,
        0.3,
        "the batch",
    )
    assert done.status == "completed", done
    assert done.output_file_id
    seen.texts.append(sdk.files.content(done.output_file_id).text)
    seen.texts.append(done.model_dump_json())
    wait_for(lambda: received, 30, 0.1, "the batch.completed webhook")
    headers, body = received[0]
    assert webhooks.verify(hook.secret, body, headers["x-gateway-signature"])
    time.sleep(0.5)  # let the worker log the delivery

    # --- the dashboard, as a platform admin -------------------------------------------------------
    from django.contrib.auth.models import User

    password = f"pw-{uuid.uuid4().hex}"
    root = User.objects.create_superuser(f"root-{tag}", "root@example.com", password)
    pages = [
        f"/teams/{team.id}/",
        f"/teams/{team.id}/webhooks/",
        f"/teams/{team.id}/webhooks/{hook.endpoint.public_id}/",
        *(f"/keys/{k.key.id}/" for k in (main, revoked, rotated)),
        *(f"/models/{m['id']}/" for m in (gpt, bad, claude)),
        "/requests/",
        "/audit/",
    ]
    dashboard = dashboard_login(live_gateway.url, root.username, password)
    shown = {page: seen.add(dashboard.get(page), page).status_code for page in pages}
    dashboard.close()
    core = [p for p in pages if "/webhooks/" not in p]  # webhook pages are newer: optional
    assert all(shown[p] == 200 for p in core), shown

    # --- search everywhere ----------------------------------------------------------------------
    canaries: dict[str, list[str]] = {}
    for name, value in provider.items():
        canaries[f"provider key {name}"] = fragments(value, len("sk-canary-provider-"))
    for name, issued in (
        ("main", main),
        ("revoked", revoked),
        ("rotated", rotated),
        ("renewed", renewed),
    ):
        canaries[f"virtual key {name}"] = fragments(issued.secret, len("sk-gw-"))
    canaries["unknown virtual key"] = fragments(unknown, len("sk-gw-"))
    canaries["webhook secret"] = fragments(hook.secret, len("whsec_"))
    canaries["webhook secret (api)"] = fragments(api_hook_secret, len("whsec_"))
    places = {
        "pg_dump": pg_dump_text(),
        "gateway log": live_gateway.log(),
        "worker log": worker.log(),
        "redis": redis_text(services_env["REDIS_URL"]),
        "responses": "\n".join(seen.texts),
        "webhook deliveries": "\n".join(b.decode(errors="replace") for _, b in received),
    }
    admin.close()
    v1.close()

    hits = [
        f"{canary} in {place}"
        for canary, needles in canaries.items()
        for place, text in places.items()
        if any(needle in text for needle in needles)
    ]
    assert hits == []
    # The places searched really hold this flow's data (a search of nothing finds nothing).
    assert f"canary-team-{tag}" in places["pg_dump"]
    assert gpt["name"] in places["pg_dump"] and str(done.id) in places["pg_dump"]
    assert "batch_run" in places["worker log"] or "Task" in places["worker log"]
    assert api_hook_secret in revealed.text
