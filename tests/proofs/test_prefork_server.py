"""The production server, `python -m config.serve`: one import, forked workers.

Promises: the workers share the imported application's memory instead of each
holding a copy; a worker that dies is replaced while the others keep serving; and
SIGTERM lets requests in flight finish, and bill, before the whole tree exits.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path

import openai
import pytest

from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def workers_of(gateway, count: int) -> list[int]:
    pid = gateway.process.pid
    return wait_for(
        lambda: kids if len(kids := children(pid)) == count else None,
        timeout=30,
        what=f"{count} workers under {pid}",
    )


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return fields


def chat(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    return reply.choices[0].message.content or ""


def test_workers_share_the_imported_application(spawn_gateway):
    gateway = spawn_gateway(workers=2, server="prefork")
    for pid in workers_of(gateway, 2):
        memory = memory_kb(pid)
        shared = memory["Shared_Clean"] + memory["Shared_Dirty"]
        # Django and litellm were imported once, in the parent: most of each worker's
        # resident memory is those pages, still shared. A spawned worker imports its
        # own copy, and only shared libraries' code is shared (about a tenth).
        assert shared > memory["Rss"] / 2, memory


def test_a_dead_worker_is_replaced_and_the_others_keep_serving(spawn_gateway, make_model, make_key):
    gateway = spawn_gateway(workers=2, server="prefork")
    name = f"prefork-{uuid.uuid4().hex[:8]}"
    make_model(name=name)
    client = openai.OpenAI(base_url=gateway.v1, api_key=make_key().secret, max_retries=0)
    assert chat(client, name)

    dead, survivor = workers_of(gateway, 2)
    os.kill(dead, signal.SIGKILL)
    pid = gateway.process.pid
    replaced = wait_for(
        lambda: kids if len(kids := children(pid)) == 2 and dead not in kids else None,
        timeout=30,
        what="a replacement worker",
    )
    assert survivor in replaced
    assert gateway.process.poll() is None
    for _ in range(10):
        assert chat(client, name)
    assert "worker" in gateway.log() and "starting a new one" in gateway.log()


def test_sigterm_finishes_requests_in_flight_and_bills_them(
    spawn_gateway, make_model, make_key, mock_upstream
):
    from billing.models import LedgerEntry

    gateway = spawn_gateway(workers=2, server="prefork")
    name = f"prefork-slow-{uuid.uuid4().hex[:8]}"
    upstream_model = f"{name};latency_ms=1500"
    make_model(name=name, provider_model=f"openai/{upstream_model}")
    client = openai.OpenAI(base_url=gateway.v1, api_key=make_key().secret, max_retries=0)
    results: list[object] = []

    def call() -> None:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            results.append(raw.headers["x-request-id"])
        except openai.OpenAIError as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    # All four are at the upstream (so inside the workers) before the signal.
    wait_for(lambda: mock_upstream.calls(upstream_model) >= 4, timeout=30, what="4 in flight")
    gateway.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)

    assert all(isinstance(r, str) for r in results) and len(results) == 4, results
    assert gateway.process.wait(30) == 0
    assert children(gateway.process.pid) == []
    billed = LedgerEntry.objects.filter(request_id__in=results, http_status=200).count()
    assert billed == 4
