"""Polling, and Celery worker processes of a test's own (each in its own process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.live import ROOT
from tests.support.waiting import wait_for

# The environment of the workers suite's worker (and of the gateways its tests start).
WORKER_ENV = {
    # Tests deliver webhooks to a receiver on 127.0.0.1.
    "GATEWAY_WEBHOOK_ALLOW_PRIVATE": "1",
    "GATEWAY_WEBHOOK_RETRY_BASE_SECONDS": "0.3",
    # A killed worker's claims lapse quickly, so the kill test stays short.
    "GATEWAY_BATCH_LEASE_SECONDS": "2",
    "GATEWAY_BATCH_TEAM_CONCURRENCY": "8",
}


@dataclass
class CeleryWorker:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL the worker's whole process group (main process and pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill9()
        except ProcessLookupError:
            pass


def spawn_worker(
    env: dict[str, str],
    log_dir: Path,
    queues: str,
    *,
    name: str = "",
    concurrency: int = 1,
    level: str = "info",
    heartbeat: bool = False,
) -> CeleryWorker:
    """A prefork worker consuming `queues` only, in its own process group (not ready yet)."""
    name = name or f"proof-{uuid.uuid4().hex[:8]}"
    log_path = log_dir / f"{name}.log"
    argv = [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool=prefork"]
    argv += [f"--concurrency={concurrency}", "-l", level, "-n", f"{name}@%h", "-Q", queues]
    argv += ["--without-gossip", "--without-mingle"]
    if not heartbeat:
        argv.append("--without-heartbeat")
    process = subprocess.Popen(
        argv,
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


def send_task(name: str, *args: Any, **kwargs: Any) -> None:
    from config.celery import app

    app.send_task(name, args=args, kwargs=kwargs)
