"""`python -m config.serve` refuses what it cannot do, before importing anything heavy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.support.live import ROOT


def serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "config.serve", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_it_refuses_a_worker_count_below_one() -> None:
    done = serve("--workers", "0")
    assert done.returncode == 2
    assert "--workers must be at least 1" in done.stderr


def test_it_names_a_bad_worker_count_from_the_environment() -> None:
    done = serve(GATEWAY_WORKERS="two")
    assert done.returncode == 2
    assert "argument --workers: invalid int value: 'two'" in done.stderr


def test_it_refuses_a_port_out_of_range() -> None:
    done = serve("--port", "70000")
    assert done.returncode == 2
    assert "--port must be between 0 and 65535" in done.stderr


def test_it_names_the_address_it_cannot_listen_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
