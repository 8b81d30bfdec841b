"""Promise: a webhook endpoint cannot stall the workers.

A team admin chooses the webhook URL, so the endpoint may be hostile: a tarpit that
accepts the connection and then answers one byte every half second (never tripping a
per-read timeout), or an endpoint that streams an endless body. The attacks:

- one delivery to a tarpit must end within GATEWAY_WEBHOOK_TIMEOUT_SECONDS in total
  (connect, headers and body), recorded as a failed attempt;
- an endless body is read only up to a small cap, then the connection is dropped;
- while several tarpit deliveries are in flight, rollups (and every other task of the
  default queue) still run promptly: deliveries have a queue, and workers, of their own;
- every Celery task has a soft and a hard time limit.

Real Celery workers (separate processes, the test Redis as broker, the test database)
and real tarpit servers on loopback; the events are emitted by the billing services.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.live import gateway_env
from tests.support.waiting import wait_for
from tests.support.workers import CeleryWorker, start_worker

pytestmark = pytest.mark.e2e

DEADLINE = 2.0  # GATEWAY_WEBHOOK_TIMEOUT_SECONDS for these workers
SLACK = 3.0  # process scheduling on a shared machine, the database writes


@dataclass
class Tarpit:
    url: str
    mode: str
    connections: int = 0
    closed: list[float] = field(default_factory=list)  # seconds each connection lasted
    sent: list[int] = field(default_factory=list)  # bytes sent on each connection
    lock: threading.Lock = field(default_factory=threading.Lock)


def _serve(tarpit: Tarpit, conn: socket.socket, stop: threading.Event) -> None:
    began = time.monotonic()
    sent = 0
    with contextlib.suppress(OSError), conn:
        conn.settimeout(10)
        conn.recv(65536)  # the request (headers and the small JSON body)
        if tarpit.mode == "drip":
            # A byte of a valid status line every half second: each read gets something
            # well within any per-read timeout, so only a total deadline ends it.
            for byte in b"HTTP/1.1 200 OK\r\nx-drip: " + b"a" * 10_000:
                if stop.is_set():
                    break
                conn.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.5)
        else:  # "flood": a 2xx with a 256 MiB body, as fast as the client reads it
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 268435456\r\n\r\n")
            chunk = b"x" * 65536
            while sent < 256 << 20 and not stop.is_set():
                conn.sendall(chunk)
                sent += len(chunk)
    with tarpit.lock:
        tarpit.closed.append(time.monotonic() - began)
        tarpit.sent.append(sent)


@contextlib.contextmanager
def open_tarpit(mode: str) -> Iterator[Tarpit]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    tarpit = Tarpit(url=f"http://127.0.0.1:{server.getsockname()[1]}/hook", mode=mode)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with tarpit.lock:
                tarpit.connections += 1
            threading.Thread(target=_serve, args=(tarpit, conn, stop), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield tarpit
    finally:
        stop.set()
        thread.join(2)
        server.close()


@pytest.fixture
def worker_env(live_gateway: Any, services_env: dict[str, str]) -> dict[str, str]:
    return gateway_env(
        services_env,
        GATEWAY_WEBHOOK_ALLOW_PRIVATE="1",  # the tarpits listen on 127.0.0.1
        GATEWAY_WEBHOOK_TIMEOUT_SECONDS=str(DEADLINE),
        GATEWAY_WEBHOOK_MAX_ATTEMPTS="1",  # no retries: each test counts attempts
    )


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Start workers for the given queues, as production runs them; all stopped after."""
    started: list[CeleryWorker] = []

    def start(queues: str) -> CeleryWorker:
        worker = start_worker(worker_env, tmp_path, queues)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill9()
    # Nothing of these tests may reach the workers of later tests.
    broker = redis.Redis.from_url(worker_env["REDIS_URL"])
    broker.delete("celery", "webhooks")


def _emit(team_id: int, url: str, count: int) -> list[int]:
    from django.db import transaction
    from django.test import override_settings

    from billing import webhooks

    with override_settings(GATEWAY_WEBHOOK_ALLOW_PRIVATE=True):  # as the workers are set
        webhooks.endpoint_create(team_id=team_id, url=url, events=["batch.completed"])
    ids: list[int] = []
    for _ in range(count):
        with transaction.atomic():
            ids += webhooks.event_emit(
                team_id=team_id,
                event_type="batch.completed",
                idempotency_key=f"redteam:{uuid.uuid4().hex}",
                data={"id": "batch_x"},
            )
    return ids


def _attempts(ids: list[int]) -> list[Any]:
    from billing.models import WebhookAttempt

    return list(WebhookAttempt.objects.filter(delivery_id__in=ids))


def test_a_dripping_endpoint_is_cut_at_the_total_deadline_and_recorded_failed(
    workers: Any, make_team: Any
) -> None:
    workers("celery,webhooks")
    team = make_team()
    with open_tarpit("drip") as tarpit:
        began = time.monotonic()
        ids = _emit(team.id, tarpit.url, 1)
        [attempt] = wait_for(
            lambda: _attempts(ids), DEADLINE + SLACK + 5, 0.1, "the attempt to be recorded"
        )
        took = time.monotonic() - began
        wait_for(lambda: tarpit.closed, 5, 0.1, "the worker to hang up")
    from billing.models import WebhookDelivery

    delivery = WebhookDelivery.objects.get(id=ids[0])
    assert delivery.status == "failed" and attempt.status_code is None
    assert "timed out" in attempt.error, attempt.error
    assert DEADLINE * 1000 * 0.9 <= attempt.duration_ms <= (DEADLINE + 1.0) * 1000
    assert took < DEADLINE + SLACK + 2, took
    assert tarpit.closed[0] < DEADLINE + 1.5, tarpit.closed


def test_an_endless_body_is_read_only_up_to_the_cap(workers: Any, make_team: Any) -> None:
    workers("celery,webhooks")
    team = make_team()
    with open_tarpit("flood") as tarpit:
        ids = _emit(team.id, tarpit.url, 1)
        [attempt] = wait_for(
            lambda: _attempts(ids), DEADLINE + SLACK + 5, 0.1, "the attempt to be recorded"
        )
        wait_for(lambda: tarpit.closed, 5, 0.1, "the worker to hang up")
    # The endpoint answered 200 at once: delivered. Only a capped start of the body was
    # read, then the connection was dropped (socket buffers hold a few MiB at most).
    assert attempt.status_code == 200 and not attempt.error, attempt.error
    assert len(attempt.response_excerpt) <= 500
    assert tarpit.sent[0] < 32 << 20, f"{tarpit.sent[0]} bytes were pulled from the endpoint"
    assert attempt.duration_ms < DEADLINE * 1000


def test_tarpit_deliveries_never_hold_up_rollups(workers: Any, make_team: Any) -> None:
    """The default queue's worker runs a rollup promptly while deliveries are stuck.

    Workers as production runs them: one for the default queue, one for `webhooks`
    (concurrency 1 each, so a single stuck delivery on the wrong worker would block).
    """
    from billing.models import RollupState

    workers("celery")
    webhook_worker = workers("webhooks")
    team = make_team()
    with open_tarpit("drip") as tarpit:
        ids = _emit(team.id, tarpit.url, 4)
        wait_for(lambda: tarpit.connections >= 1, 10, 0.05, "a delivery to reach the tarpit")
        before = RollupState.objects.first()
        sent_at = time.monotonic()
        from config.celery import app

        app.send_task("billing.rollups_update")

        previous = before.last_run_at if before else None

        def rolled_up() -> bool:
            state = RollupState.objects.first()
            ran = state.last_run_at if state else None
            return ran is not None and (previous is None or ran > previous)

        wait_for(rolled_up, 8, 0.1, "the rollup, while deliveries sit in a tarpit")
        assert time.monotonic() - sent_at < 8
        # The deliveries did go out (on their own worker) and each failed at the deadline.
        wait_for(lambda: len(_attempts(ids)) == len(ids), len(ids) * (DEADLINE + 2) + 10, 0.2)
    assert all("timed out" in a.error for a in _attempts(ids))
    assert webhook_worker.process.poll() is None


def test_every_task_has_a_soft_and_a_hard_time_limit() -> None:
    from config.celery import app

    app.loader.import_default_modules()
    tasks = {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}
    assert {"billing.webhook_deliver", "gateway.batch_run", "billing.rollups_update"} <= set(tasks)
    for name, task in tasks.items():
        soft = task.soft_time_limit or app.conf.task_soft_time_limit
        hard = task.time_limit or app.conf.task_time_limit
        assert soft and hard and soft < hard, (name, soft, hard)
    # A delivery's limits leave room for its own deadline, and it has a queue of its own.
    from django.conf import settings

    deliver = tasks["billing.webhook_deliver"]
    assert deliver.soft_time_limit > settings.GATEWAY_WEBHOOK_TIMEOUT_SECONDS
    route = app.amqp.router.route({}, "billing.webhook_deliver")
    assert route["queue"].name == "webhooks"
    assert app.amqp.router.route({}, "billing.email_send")["queue"].name == "webhooks"
    assert app.amqp.router.route({}, "billing.rollups_update")["queue"].name == "celery"
