"""Fixtures for tests that break things on purpose: private gateways and a private Redis."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import LiveGateway, free_port, gateway_env, start_gateway


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
            import time

            time.sleep(0.05)
    found = PrivateRedis(url, process)
    try:
        yield found
    finally:
        found.resume()
        process.terminate()
        process.wait(10)


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
        if gateway.process.poll() is None:
            gateway.process.terminate()
            try:
                gateway.process.wait(10)
            except subprocess.TimeoutExpired:
                gateway.process.kill()
