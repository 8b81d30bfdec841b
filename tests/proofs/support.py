"""Helpers for the proofs: a canary listener, a redirector, Celery workers, dashboard logins."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT
from tests.support import Canary, CeleryWorker, open_canary, wait_for  # noqa: F401 - re-exported

# --- a redirector: answers everything with a 302 to a target ----------------------------------


@dataclass
class Redirector:
    url: str
    hits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return self.hits


@contextlib.contextmanager
def open_redirector(target: str) -> Iterator[Redirector]:
    found = Redirector(url="")

    class Handler(BaseHTTPRequestHandler):
        def _redirect(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            with found.lock:
                found.hits += 1
            self.send_response(302)
            self.send_header("location", f"{target}{self.path}")
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_HEAD = _redirect

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    found.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()


# --- Celery workers of our own ------------------------------------------------------------------


def spawn_worker(env: dict[str, str], log_dir: Path, queues: str) -> CeleryWorker:
    """A prefork worker consuming `queues` only, in its own process group (not ready yet)."""
    name = f"proof-{uuid.uuid4().hex[:8]}"
    log_path = log_dir / f"{name}.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "-l",
            "info",
            "-n",
            f"{name}@%h",
            "-Q",
            queues,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killpg reaches the pool children
    )
    return CeleryWorker(name, process, log_path)


def wait_ready(worker: CeleryWorker, timeout: float = 90) -> CeleryWorker:
    from config.celery import app

    destination = f"{worker.name}@{socket.gethostname()}"

    def ready() -> bool:
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited:\n{worker.log()[-4000:]}")
        return bool(app.control.ping(destination=[destination], timeout=0.5))

    try:
        wait_for(ready, timeout, 0.2, "the Celery worker to answer a ping")
    except BaseException:
        worker.kill9()
        raise
    return worker


def start_worker(env: dict[str, str], log_dir: Path, queues: str) -> CeleryWorker:
    return wait_ready(spawn_worker(env, log_dir, queues))


# --- the dashboard over real HTTP ----------------------------------------------------------------

_CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


def dashboard_login(base_url: str, username: str, password: str) -> httpx.Client:
    """A cookie-keeping client signed in through the real /login/ form (CSRF included)."""
    client = httpx.Client(base_url=base_url, timeout=30, follow_redirects=False)
    page = client.get("/login/")
    assert page.status_code == 200, page.text[:500]
    match = _CSRF_FIELD.search(page.text)
    assert match, "no CSRF token on the login page"
    response = client.post(
        "/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": match.group(1)},
    )
    assert response.status_code == 302, (response.status_code, response.text[:500])
    assert "sessionid" in client.cookies, "the login set no session cookie"
    return client


def csrf_headers(client: httpx.Client) -> dict[str, str]:
    token = client.cookies.get("csrftoken") or ""
    return {"x-csrftoken": token, "referer": f"{client.base_url}/"}


def dashboard_post(client: httpx.Client, path: str, data: dict[str, Any]) -> httpx.Response:
    token = client.cookies.get("csrftoken") or ""
    return client.post(
        path, data={**data, "csrfmiddlewaretoken": token}, headers=csrf_headers(client)
    )


# --- error shapes ------------------------------------------------------------------------------


def openai_error_shape(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"error"}
        and isinstance(body["error"], dict)
        and set(body["error"]) == {"message", "type", "param", "code"}
        and isinstance(body["error"]["message"], str)
        and bool(body["error"]["message"])
        and isinstance(body["error"]["type"], str)
    )


def anthropic_error_shape(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"type", "error"}
        and body["type"] == "error"
        and isinstance(body["error"], dict)
        and set(body["error"]) == {"type", "message"}
        and isinstance(body["error"]["message"], str)
        and bool(body["error"]["message"])
    )
