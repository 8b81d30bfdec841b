"""Real Celery workers for the worker tests: separate processes on the test database.

Workers are started as `celery -A config worker --pool=prefork --concurrency=2 -Q
celery,webhooks` (both queues config/celery.py routes to) with
the live gateway's environment (the test database, the test Redis as broker), each in
its own process group so a test can `kill -9` a whole worker tree. Tasks are sent by
name through the broker: nothing here runs eagerly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.support.listeners import serve_http
from tests.support.live import LiveGateway, gateway_env
from tests.support.waiting import wait_for
from tests.support.workers import WORKER_ENV, CeleryWorker, spawn_worker, wait_ready


@dataclass
class Workers:
    env: dict[str, str]
    log_dir: Path
    started: list[CeleryWorker] = field(default_factory=list)
    current: CeleryWorker | None = None

    def start(self) -> CeleryWorker:
        # Every queue the app routes to (config/celery.py): one worker does all here.
        worker = spawn_worker(
            self.env,
            self.log_dir,
            "celery,webhooks",
            name=f"w{len(self.started)}-{uuid.uuid4().hex[:6]}",
            concurrency=2,
            level="warning",
            heartbeat=True,
        )
        self.started.append(worker)
        wait_ready(worker, 60)
        self.current = worker
        return worker

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until the broker queue is empty and the worker runs nothing.

        Called after each test, before pytest-django empties the tables: a task a test
        set off (an alert, a retry, a redelivery) must not still be writing when the
        flush takes its locks, or Postgres aborts one of the two with a deadlock.
        """
        import redis

        from config.celery import app

        if self.current is None or self.current.process.poll() is not None:
            return
        broker = redis.Redis.from_url(self.env["REDIS_URL"])
        destination = [f"{self.current.name}@{socket.gethostname()}"]

        def idle() -> bool:
            if broker.llen("celery") or broker.llen("webhooks"):
                return False
            inspect = app.control.inspect(destination=destination, timeout=1.0, limit=1)
            for busy in (inspect.active(), inspect.reserved(), inspect.scheduled()):
                if busy is None:  # no answer (killed or busy): treat as idle, never hang
                    continue
                if any(busy.values()):
                    return False
            return True

        with contextlib.suppress(AssertionError):  # still busy: the flush retries
            wait_for(idle, timeout, 0.1, "the Celery worker to go idle")

    def ensure(self) -> CeleryWorker:
        if self.current is None or self.current.process.poll() is not None:
            return self.start()
        return self.current

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture(scope="session")
def celery_workers(
    live_gateway: LiveGateway,
    services_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Workers]:
    log_dir = tmp_path_factory.mktemp("celery")
    mail_dir = tmp_path_factory.mktemp("mail")
    env = gateway_env(
        services_env,
        **WORKER_ENV,
        EMAIL_BACKEND="django.core.mail.backends.filebased.EmailBackend",
        EMAIL_FILE_PATH=str(mail_dir),
    )
    workers = Workers(env, log_dir)
    try:
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture
def worker(celery_workers: Workers) -> Iterator[CeleryWorker]:
    """A running worker (the one a previous test killed is replaced), idle again after."""
    yield celery_workers.ensure()
    celery_workers.wait_idle()


@pytest.fixture
def mail_dir(celery_workers: Workers) -> Path:
    return Path(celery_workers.env["EMAIL_FILE_PATH"])


# --- a webhook receiver -----------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    received: list[Received] = field(default_factory=list)
    # Status codes to answer with, in order; 200 once they run out.
    script: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[bytes]:
        with self.lock:
            return [r.body for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            with found.lock:
                found.received.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                status = found.script.pop(0) if found.script else 200
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler) as url:
        found.url = f"{url}/hooks"
        yield found
