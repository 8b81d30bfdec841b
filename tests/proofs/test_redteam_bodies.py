"""Issue #12, item 6: body limits are enforced while reading, on every route, before auth.

An attacker sends a body with `Transfer-Encoding: chunked` and no Content-Length, so
no header announces its size. The gateway must count the bytes as they arrive and
answer 413 once the route's limit is passed (plus at most one read buffer), on the
data plane, the management API (with or without the admin token), /login/ and the
dashboard, without ever holding the whole body in memory or in a temp file.

Every test drives a raw socket against a live gateway subprocess (one uvicorn
worker) with small limits, so "stopped early" is unmistakable.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.proofs.test_fuzz import fuzz_settings
from tests.support.live import ADMIN_TOKEN, LiveGateway, gateway_env, start_gateway

pytestmark = pytest.mark.e2e

LIMIT = 64 * 1024
# What a server may have taken in beyond the limit before it notices: its read buffer
# (asyncio reads up to 256 KiB at once) plus what sits in the loopback socket buffers
# while the client trickles. Far below the megabytes the client is ready to send.
SLACK = 512 * 1024
TOTAL = 6 * 1024 * 1024
PIECE = 8 * 1024


class Gateway:
    def __init__(self, live: LiveGateway, tmpdir: Path, files_dir: Path) -> None:
        self.live = live
        self.tmpdir = tmpdir
        self.files_dir = files_dir
        parts = urlsplit(live.url)
        self.host, self.port = parts.hostname or "127.0.0.1", int(parts.port or 80)

    @property
    def pid(self) -> int:
        return self.live.process.pid

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def open_temp_files(self) -> list[str]:
        """Files the gateway holds open under its TMPDIR (even unlinked O_TMPFILE ones)."""
        found = []
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(self.tmpdir)):
                found.append(target)
        return found


def _spawn(services_env: dict[str, str], root: Path, **limits: str) -> Gateway:
    tmpdir, files_dir = root / "tmp", root / "files"
    tmpdir.mkdir()
    files_dir.mkdir()
    env = gateway_env(
        services_env,
        TMPDIR=str(tmpdir),
        GATEWAY_FILES_DIR=str(files_dir),
        **limits,
    )
    return Gateway(start_gateway(env, root / "gateway.log"), tmpdir, files_dir)


def _stop(gateway: Gateway) -> None:
    process = gateway.live.process
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def small_limits(live_gateway: LiveGateway, services_env: dict[str, str]) -> Iterator[Gateway]:
    limit = str(LIMIT)
    gateway = _spawn(
        services_env,
        Path(tempfile.mkdtemp(prefix="bodies-")),
        GATEWAY_MAX_BODY_BYTES=limit,
        GATEWAY_SITE_MAX_BODY_BYTES=limit,
        GATEWAY_FILE_MAX_BYTES=limit,
    )
    yield gateway
    _stop(gateway)


class Sent:
    """What one chunked upload did: bytes the client got in, and the answer."""

    def __init__(self, accepted: int, answer: bytes) -> None:
        self.accepted = accepted
        self.answer = answer

    @property
    def status(self) -> int:
        line = self.answer.split(b"\r\n", 1)[0]
        assert line.startswith(b"HTTP/1.1 "), self.answer[:200]
        return int(line.split()[1])

    @property
    def headers(self) -> dict[str, str]:
        head = self.answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head)}

    def json(self) -> Any:
        body = self.answer.split(b"\r\n\r\n", 1)[1]
        if self.headers.get("transfer-encoding") == "chunked":
            body = _dechunk(body)
        return orjson.loads(body)


def _dechunk(raw: bytes) -> bytes:
    out = b""
    while raw:
        size_line, raw = raw.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, raw = out + raw[:size], raw[size + 2 :]
    return out


def send_chunked(
    gateway: Gateway,
    path: str,
    headers: dict[str, str],
    *,
    total: int = TOTAL,
    piece: bytes = b"x" * PIECE,
    pause: float = 0.001,
    watch: list[str] | None = None,
) -> Sent:
    """POST `total` bytes chunked (no Content-Length), a piece at a time, stopping as soon
    as the server answers or hangs up. `watch` collects temp files the gateway opens."""
    sock = socket.create_connection((gateway.host, gateway.port), timeout=30)
    # A small client send buffer: "accepted" then stays close to what the server read.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    head = f"POST {path} HTTP/1.1\r\nhost: {gateway.host}\r\ntransfer-encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(head.encode() + b"\r\n")
    accepted = 0
    answer = b""
    hung_up = False
    try:
        while accepted < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            size = min(len(piece), total - accepted)
            try:
                sock.sendall(b"%x\r\n" % size + piece[:size] + b"\r\n")
            except OSError:
                hung_up = True
                break
            accepted += size
            if watch is not None:
                watch.extend(gateway.open_temp_files())
            if pause:
                time.sleep(pause)
        else:
            sock.sendall(b"0\r\n\r\n")
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer:
                head_part, body = answer.split(b"\r\n\r\n", 1)
                length = [
                    int(h.split(b":", 1)[1])
                    for h in head_part.lower().split(b"\r\n")
                    if h.startswith(b"content-length:")
                ]
                if length and len(body) >= length[0]:
                    break
                if not length and body.endswith(b"0\r\n\r\n"):
                    break
    finally:
        sock.close()
    assert answer, f"no answer after {accepted} bytes (hung up: {hung_up})"
    return Sent(accepted, answer)


OPENAI_ROUTES = [
    ("/v1/chat/completions", {"authorization": "Bearer sk-gw-not-checked-yet"}),
    ("/v1/responses", {}),
    ("/v1/embeddings", {"authorization": "Bearer sk-gw-not-checked-yet"}),
    ("/v1/batches", {}),
    ("/api/admin/teams", {"authorization": f"Bearer {ADMIN_TOKEN}"}),
    ("/api/admin/teams", {}),
    ("/api/admin/teams", {"authorization": "Bearer wrong-admin-token"}),
]
FORM = {"content-type": "application/x-www-form-urlencoded"}
SITE_ROUTES = [("/login/", FORM), ("/teams/new/", FORM), ("/keys/new/", FORM)]


def _assert_refused_early(sent: Sent) -> None:
    assert sent.status == 413, sent.answer[:300]
    assert sent.accepted <= LIMIT + SLACK, (
        f"the gateway took {sent.accepted} bytes of a {TOTAL}-byte body before answering; "
        f"the limit is {LIMIT}"
    )
    assert sent.headers.get("connection") == "close"


@pytest.mark.parametrize(("path", "headers"), OPENAI_ROUTES)
def test_it_refuses_a_chunked_body_past_the_limit_in_openai_shape(
    small_limits: Gateway, path: str, headers: dict[str, str]
) -> None:
    sent = send_chunked(small_limits, path, {"content-type": "application/json", **headers})
    _assert_refused_early(sent)
    error = sent.json()["error"]
    assert error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]


def test_it_refuses_a_chunked_messages_body_in_anthropic_shape(small_limits: Gateway) -> None:
    sent = send_chunked(
        small_limits,
        "/v1/messages",
        {"content-type": "application/json", "x-api-key": "sk-gw-unchecked"},
    )
    _assert_refused_early(sent)
    body = sent.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "request_too_large"


@pytest.mark.parametrize(("path", "headers"), SITE_ROUTES)
def test_it_refuses_a_chunked_form_on_login_and_the_dashboard(
    small_limits: Gateway, path: str, headers: dict[str, str]
) -> None:
    sent = send_chunked(small_limits, path, headers)
    _assert_refused_early(sent)


def test_it_refuses_a_chunked_upload_past_the_file_cap_and_keeps_nothing(
    small_limits: Gateway, make_key: Any
) -> None:
    secret = make_key().secret
    boundary = "bodies-boundary"
    opening = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        "content-type: application/jsonl\r\n\r\n"
    ).encode()
    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}\n'
    sent = send_chunked(
        small_limits,
        "/v1/files",
        {
            "authorization": f"Bearer {secret}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
        piece=(opening + line * (PIECE // len(line)))[:PIECE],
    )
    _assert_refused_early(sent)
    assert list(small_limits.files_dir.rglob("*")) == [], "a partial upload was kept"
    # Under the cap, a chunked upload (no Content-Length) is stored whole.
    content = line * 10
    multipart = opening + content + f"\r\n--{boundary}--\r\n".encode()
    ok = send_chunked(
        small_limits,
        "/v1/files",
        {
            "authorization": f"Bearer {secret}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
        total=len(multipart),
        piece=multipart,
    )
    assert ok.status == 200, ok.answer[:500]
    assert ok.json()["bytes"] == len(content)


def test_it_still_serves_a_chunked_body_under_the_limit(
    small_limits: Gateway, make_model: Any, make_key: Any
) -> None:
    model = make_model()
    body = orjson.dumps(
        {"model": model.name, "messages": [{"role": "user", "content": "y" * 20_000}]}
    )
    sent = send_chunked(
        small_limits,
        "/v1/chat/completions",
        {"content-type": "application/json", "authorization": f"Bearer {make_key().secret}"},
        total=len(body),
        piece=body[:PIECE] if len(body) <= PIECE else body,
    )
    assert sent.status == 200, sent.answer[:500]


def test_it_refuses_by_content_length_before_reading_and_before_auth(
    small_limits: Gateway,
) -> None:
    # The fast path: a declared size over the limit is refused without reading a byte.
    for path in ("/v1/chat/completions", "/api/admin/teams", "/login/"):
        response = httpx.post(
            f"{small_limits.live.url}{path}", content=b"x" * (LIMIT + 1), timeout=30
        )
        assert response.status_code == 413, (path, response.text[:200])
        assert response.json()["error"]["code"] == "request_too_large"


def test_it_neither_buffers_nor_spools_an_oversized_body(
    live_gateway: LiveGateway, services_env: dict[str, str], tmp_path: Path
) -> None:
    """Default limits (8 MiB on the data plane): a 40 MiB chunked body sent as fast as
    the socket takes it must not raise the gateway's peak memory by anything like its
    size, and no request body may go to a temp file."""
    gateway = _spawn(services_env, tmp_path)
    try:
        watched: list[str] = []
        # Warm up (first request imports lazily), then take the peak as the baseline.
        send_chunked(gateway, "/v1/chat/completions", {}, total=PIECE, piece=b"{" * PIECE)
        before = gateway.peak_rss_kib()
        big = 40 * 1024 * 1024
        sent = send_chunked(
            gateway,
            "/v1/chat/completions",
            {"content-type": "application/json"},
            total=big,
            piece=b"x" * (256 * 1024),
            pause=0,
            watch=watched,
        )
        assert sent.status == 413
        assert sent.accepted < 8 * 1024 * 1024 + 4 * 1024 * 1024, sent.accepted
        grown_mib = (gateway.peak_rss_kib() - before) / 1024
        assert grown_mib < 30, f"peak RSS grew by {grown_mib:.0f} MiB for a {big >> 20} MiB body"
        # The site's limit keeps a form body in memory too.
        site = send_chunked(gateway, "/login/", FORM, total=big, watch=watched, pause=0)
        assert site.status == 413
        assert watched == [], f"request bodies were spooled to disk: {sorted(set(watched))}"
        assert list(gateway.tmpdir.iterdir()) == []
    finally:
        _stop(gateway)


ROUTES = [p for p, _ in OPENAI_ROUTES] + ["/v1/messages", "/v1/files"] + [p for p, _ in SITE_ROUTES]


def test_fuzzed_chunked_bodies_across_routes(small_limits: Gateway) -> None:
    """Any route, any chunking, any size: never more than the limit is taken in, an
    oversized body always gets 413, and a body under the limit never does."""

    @fuzz_settings(40)
    @given(
        path=st.sampled_from(ROUTES),
        size=st.one_of(
            st.integers(min_value=0, max_value=LIMIT),
            st.integers(min_value=LIMIT + 1, max_value=LIMIT * 6),
        ),
        piece=st.integers(min_value=1, max_value=40_000),
        content_type=st.sampled_from(
            ["application/json", "application/x-www-form-urlencoded", "text/plain"]
        ),
    )
    def run(path: str, size: int, piece: int, content_type: str) -> None:
        sent = send_chunked(
            small_limits,
            path,
            {"content-type": content_type},
            total=size,
            piece=b"a" * piece,
            pause=0,
        )
        if size > LIMIT:
            assert sent.status == 413, (path, size, sent.answer[:200])
            assert sent.accepted <= LIMIT + SLACK
        else:
            assert sent.status != 413, (path, size, sent.answer[:200])
            assert sent.status < 500, (path, size, sent.answer[:300])

    run()
