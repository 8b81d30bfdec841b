"""The processes tests run against: the mock upstream, gateway subprocesses, settings probes.

A gateway runs as a real ASGI server in a subprocess, on the test database pytest-django
creates, so whatever a test wants it to see must be committed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex


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


def stop_process(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """Terminate a child process, killing it if it does not exit within `timeout`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def settings_at_start_up(probe: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `probe` (Python that reads the settings) in a fresh process with only `env` set."""
    clean = {"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "config.settings"}
    clean |= {"SECRET_KEY": "x" * 50, "GATEWAY_VAR_DIR": tempfile.mkdtemp(), **env}
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=clean, capture_output=True, text=True
    )
