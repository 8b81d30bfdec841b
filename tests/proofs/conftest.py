"""Fixtures for the proofs (tests that break things on purpose), and the `soak` marker.

Private gateways and a private Redis a test may stop, kill or SIGSTOP; a canary and a
redirector for the SSRF proofs.

Soak variants (longer, more examples) are marked `@pytest.mark.soak` and skipped
unless GATEWAY_SOAK=1, which `make soak` sets: the project's pytest options select
no markers, so the skip lives here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.listeners import Canary, Redirector, open_canary, open_redirector
from tests.support.live import LiveGateway, free_port, gateway_env, start_gateway, stop_process

SOAK = os.environ.get("GATEWAY_SOAK") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "soak: a long variant of a proof; runs only with GATEWAY_SOAK=1 (make soak)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SOAK:
        return
    skip = pytest.mark.skip(reason="soak variant: run `make soak` (GATEWAY_SOAK=1)")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)


@dataclass
class PrivateRedis:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    found = PrivateRedis(url, process)
    try:
        yield found
    finally:
        found.resume()
        stop_process(process)


@pytest.fixture
def spawn_gateway(
    live_gateway: LiveGateway, services_env: dict[str, str], tmp_path: Path
) -> Iterator[Any]:
    """Start extra gateway processes on the test database; all are stopped afterwards."""
    started: list[LiveGateway] = []

    def spawn(workers: int = 1, server: str = "uvicorn", **env: str) -> LiveGateway:
        log_path = tmp_path / f"gateway-{len(started)}.log"
        gateway = start_gateway(gateway_env(services_env, **env), log_path, workers, server)
        started.append(gateway)
        return gateway

    yield spawn
    for gateway in started:
        stop_process(gateway.process)


@pytest.fixture
def canary() -> Iterator[Canary]:
    with open_canary() as trap:
        yield trap


@pytest.fixture
def redirector(canary: Canary) -> Iterator[Redirector]:
    with open_redirector(f"http://127.0.0.1:{canary.port}") as server:
        yield server
