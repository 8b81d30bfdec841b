"""Fixtures for the reliability and security proofs, and the `soak` marker.

Soak variants (longer, more examples) are marked `@pytest.mark.soak` and skipped
unless GATEWAY_SOAK=1, which `make soak` sets: the project's pytest options select
no markers, so the skip lives here.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveGateway, gateway_env, start_gateway
from tests.proofs.support import Canary, Redirector, open_canary, open_redirector

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


@pytest.fixture
def private_gateway(
    live_gateway: LiveGateway, services_env: dict[str, str], tmp_path: Path
) -> Iterator[Any]:
    """Start gateways of our own on the test database; all are stopped afterwards."""
    started: list[LiveGateway] = []

    def spawn(workers: int = 1, **env: str) -> LiveGateway:
        gateway = start_gateway(
            gateway_env(services_env, **env), tmp_path / f"gateway-{len(started)}.log", workers
        )
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
                gateway.process.wait(10)


@pytest.fixture
def canary() -> Iterator[Canary]:
    with open_canary() as trap:
        yield trap


@pytest.fixture
def redirector(canary: Canary) -> Iterator[Redirector]:
    with open_redirector(f"http://127.0.0.1:{canary.port}") as server:
        yield server
