"""Shared fixtures: real Postgres and Redis, the mock upstream, and a live gateway.

The gateway runs as a real ASGI server (uvicorn) in a subprocess, on the test
database pytest-django creates. Tests that talk to it must commit their data, so
they use `django_db(transaction=True)` (the `live` marker below adds it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tests.support.live import (
    ROOT,
    LiveGateway,
    MockUpstream,
    free_port,
    gateway_env,
    start_gateway,
    stop_process,
    wait_http,
)


def _flush_retrying_deadlocks() -> None:
    """Retry the transactional tests' table flush when Postgres picks it as a deadlock victim.

    The flush TRUNCATEs every table while a live gateway or a Celery worker from the test
    may still be finishing a write (a stream's billing, an alert, a redelivered task);
    Postgres then aborts one side. Retrying the flush is safe: it only empties tables.
    """
    from django.core.management.base import CommandError
    from django.db.utils import OperationalError
    from django.test.testcases import TransactionTestCase

    # A private method of Django's test case (not in the type stubs).
    original = TransactionTestCase._fixture_teardown  # type: ignore[attr-defined]

    def teardown(self: TransactionTestCase) -> None:
        for attempt in range(5):
            try:
                original(self)
                return
            # The flush command wraps the database's error in a CommandError.
            except (OperationalError, CommandError) as exc:
                if "deadlock" not in f"{exc} {exc.__cause__}" or attempt == 4:
                    raise
                time.sleep(0.5)

    TransactionTestCase._fixture_teardown = teardown  # type: ignore[attr-defined]


_flush_retrying_deadlocks()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.django_db(transaction=True))


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    database_url = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL", "")
    if not database_url.startswith("postgres") or not redis_url:
        pytest.fail(
            "These tests need real Postgres and Redis: run them with `make test`, which starts "
            "both, or export DATABASE_URL and REDIS_URL yourself."
        )
    return {"DATABASE_URL": database_url, "REDIS_URL": redis_url}


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mock_upstream", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc=process)
        yield MockUpstream(url, process)
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def live_gateway(
    django_db_setup: Any,
    django_db_blocker: Any,
    services_env: dict[str, str],
    mock_upstream: MockUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveGateway]:
    import redis

    redis.Redis.from_url(services_env["REDIS_URL"]).flushdb()
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    gateway = start_gateway(gateway_env(services_env), log_path)
    try:
        yield gateway
    finally:
        stop_process(gateway.process)


# --- data factories (through the services, as the admin would) --------------------------------


@pytest.fixture
def make_model(mock_upstream: MockUpstream) -> Any:
    from gateway import services

    def make(name: str | None = None, provider_model: str | None = None, **fields: Any) -> Any:
        name = name or f"model-{uuid.uuid4().hex[:8]}"
        fields.setdefault("api_base", mock_upstream.api_base)
        fields.setdefault("input_cost_per_million", Decimal("1.00"))
        fields.setdefault("output_cost_per_million", Decimal("2.00"))
        return services.deployment_create(
            name=name, provider_model=provider_model or f"openai/{name}", **fields
        )

    return make


@pytest.fixture
def make_team() -> Any:

    def make(name: str | None = None, **fields: Any) -> Any:
        from accounts import services as account_services

        return account_services.team_create(name=name or f"team-{uuid.uuid4().hex[:8]}", **fields)

    return make


@pytest.fixture
def make_key(make_team: Any) -> Any:

    def make(team: Any = None, name: str = "test key", **fields: Any) -> Any:
        from accounts import services as account_services

        return account_services.key_create(team=team or make_team(), name=name, **fields)

    return make
