"""Shared fixtures: real Postgres and Redis, the mock upstream, and a live gateway.

The gateway runs as a real ASGI server (uvicorn) in a subprocess, on the test
database pytest-django creates. Tests that talk to it must commit their data, so
they use `django_db(transaction=True)` (the `live` marker below adds it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s: {last}")


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


@dataclass
class MockUpstream:
    url: str
    process: subprocess.Popen[bytes]

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_mock/stats", timeout=5).json())

    def calls(self, model: str) -> int:
        return int(self.stats()["by_model"].get(model, 0))


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
        process.terminate()
        process.wait(10)


@dataclass
class LiveGateway:
    url: str
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/api/admin",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def gateway_env(services_env: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of a gateway process that shares the test database."""
    db = settings.DATABASES["default"]
    database_url = (
        f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    )
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": services_env["REDIS_URL"],
        # The same secret as the test process, so credentials it encrypts decrypt there.
        "SECRET_KEY": settings.SECRET_KEY,
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        # Tests create models and revoke keys and expect to see it at once.
        "GATEWAY_CONFIG_POLL_SECONDS": "0",
        "GATEWAY_KEY_CACHE_SECONDS": "0.2",
        "GATEWAY_SECURE_COOKIES": "0",
        # Never the repository's var/: a test's spooled rows must not leak into another.
        "GATEWAY_LEDGER_SPOOL_DIR": tempfile.mkdtemp(prefix="gateway-spool-"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("GATEWAY_DEBUG", None)
    env.update(extra)
    return env


def start_gateway(
    env: dict[str, str], log_path: Path, workers: int = 1, server: str = "uvicorn"
) -> LiveGateway:
    """A gateway subprocess on a free port.

    server="uvicorn" is one plain uvicorn process (killing its pid kills the server,
    which the crash tests rely on); "prefork" is the production server,
    `python -m config.serve`, whose pid is the supervisor of forked workers.
    """
    port = free_port()
    log = log_path.open("wb")
    argv = [sys.executable, "-m"]
    if server == "prefork":
        argv += ["config.serve", "--host", "127.0.0.1", "--port", str(port)]
    else:
        argv += ["uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--no-access-log", "--lifespan", "off"]
    argv += ["--workers", str(workers)]
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health/live", timeout=60, proc=process)
    except RuntimeError:
        process.kill()
        raise RuntimeError(log_path.read_text(errors="replace")[-4000:]) from None
    return LiveGateway(url, process, env, log_path)


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
        gateway.process.terminate()
        try:
            gateway.process.wait(10)
        except subprocess.TimeoutExpired:
            gateway.process.kill()


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
