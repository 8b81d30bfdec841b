"""Promise: a response the client received in full has its ledger row, even after kill -9.

Clients hammer a gateway with JSON and streamed requests; the gateway is killed
with SIGKILL mid-flight. Every response that had fully arrived (a complete JSON
body, or a stream that reached `data: [DONE]`) must have its ledger row.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_it_never_delivers_a_response_without_a_ledger_row(spawn_gateway, make_model, make_key):
    from billing.models import LedgerEntry

    gateway = spawn_gateway()
    name = f"kill-{uuid.uuid4().hex[:8]}"
    make_model(name=name, provider_model=f"openai/{name};latency_ms=20;chunk_delay_ms=5")
    issued = make_key()
    delivered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(stream: bool) -> None:
        body = {"model": name, "messages": [{"role": "user", "content": "x"}], "stream": stream}
        headers = {"authorization": f"Bearer {issued.secret}"}
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    if stream:
                        with client.stream(
                            "POST", f"{gateway.v1}/chat/completions", json=body, headers=headers
                        ) as r:
                            lines = list(r.iter_lines())
                            if r.status_code == 200 and lines and lines[-1] == "data: [DONE]":
                                with lock:
                                    delivered.append(r.headers["x-request-id"])
                    else:
                        r = client.post(
                            f"{gateway.v1}/chat/completions", json=body, headers=headers
                        )
                        if r.status_code == 200 and r.json()["choices"]:
                            with lock:
                                delivered.append(r.headers["x-request-id"])
                except (httpx.HTTPError, ValueError):
                    if stop.is_set():
                        return

    threads = [threading.Thread(target=client_loop, args=(i % 2 == 0,)) for i in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    os.kill(gateway.process.pid, signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join(15)

    assert len(delivered) > 20  # the gateway really was serving when it died
    rows = set(
        LedgerEntry.objects.filter(request_id__in=delivered).values_list("request_id", flat=True)
    )
    missing = [rid for rid in delivered if rid not in rows]
    assert missing == []
