"""Promise: with Postgres down, requests fail fast with a clear 503 or their ledger rows are
durably spooled; after recovery, upstream calls = ledger rows.

The design (billing/spool.py): a key already checked within GATEWAY_KEY_CACHE_SECONDS
keeps working, and its ledger rows are fsync'd to a local spool before the response
ends; they are replayed into Postgres once it answers again. A key the process has not
seen recently cannot be checked and gets 503 `database_unavailable`, within the
database timeout.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _pg_ctl(action: str) -> None:
    args = [f"{os.environ['PG_BIN_DIR']}/pg_ctl", "-D", os.environ["PG_DATA_DIR"], "-w", action]
    if action == "stop":
        args += ["-m", "fast"]
    else:
        # The server must not inherit our pipes, or run() would wait for it to exit.
        args += ["-l", os.environ.get("PG_LOG", "/dev/null")]
    user = os.environ.get("PG_CTL_USER")
    command = ["runuser", "-u", user, "--", *args] if user else args
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60
    )


def test_it_spools_during_a_postgres_outage_and_replays_after(
    spawn_gateway, mock_upstream, make_model, make_key, tmp_path
):
    if not os.environ.get("PG_DATA_DIR"):
        pytest.fail("scripts/services.sh must start Postgres itself for this test (make test does)")
    from billing.models import LedgerEntry

    gateway = spawn_gateway(
        GATEWAY_KEY_CACHE_SECONDS="60",
        GATEWAY_DB_TIMEOUT_SECONDS="1",
        GATEWAY_CONFIG_POLL_SECONDS="1",
        GATEWAY_LEDGER_SPOOL_DIR=str(tmp_path / "spool"),
    )
    name = f"outage-{uuid.uuid4().hex[:8]}"
    make_model(name=name)
    warm, cold = make_key(), make_key()
    body = {"model": name, "messages": [{"role": "user", "content": "during the outage"}]}

    def post(secret: str) -> httpx.Response:
        return httpx.post(
            f"{gateway.v1}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {secret}"},
            timeout=30,
        )

    assert post(warm.secret).status_code == 200  # the warm key is now cached
    _pg_ctl("stop")
    try:
        delivered, durations = [], []
        for _ in range(5):
            started = time.monotonic()
            response = post(warm.secret)
            durations.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
            delivered.append(response.headers["x-request-id"])
        started = time.monotonic()
        refused = post(cold.secret)
        cold_duration = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "database_unavailable"
        # Bounded by the configured database timeout (1 s), never hung.
        assert max(durations) < 5 and cold_duration < 5, (durations, cold_duration)
        assert any((tmp_path / "spool").iterdir())
    finally:
        _pg_ctl("start")
        from django.db import connection

        connection.close()  # the test's own connection died with the server

    # After recovery the next successful write replays the spool.
    deadline = time.monotonic() + 30
    while True:
        post(warm.secret)
        found = LedgerEntry.objects.filter(request_id__in=delivered).count()
        if found == len(delivered):
            break
        assert time.monotonic() < deadline, f"{found} of {len(delivered)} rows replayed"
        time.sleep(1)
    rows = LedgerEntry.objects.filter(key_id=warm.key.id, status="success").count()
    assert rows == mock_upstream.calls(name)  # every upstream call has its row
