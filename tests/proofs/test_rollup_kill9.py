"""Promise 2: usage rollups are exact even when a worker is killed -9 in the middle of one.

A real Celery worker starts a rollup over many ledger rows; its whole process tree is
SIGKILLed while the rollup transaction is writing. The broker still holds the task
unacknowledged; once its visibility timeout passes (fast-forwarded here by backdating
the message's delivery time in the broker, instead of waiting an hour) a new worker
gets it redelivered and reruns it. The rollups must then equal a clean recomputation
from the ledger, and the reconciliation must report no difference.
(Killing a worker mid-batch is tests/workers/test_batches.py.)
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.db import connection

from tests.support.live import LiveGateway, gateway_env
from tests.support.waiting import wait_for
from tests.support.workers import CeleryWorker, spawn_worker, wait_ready

pytestmark = pytest.mark.e2e

TEAMS = (710_001, 710_002, 710_003, 710_004)
METRICS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "list_cost_micro_usd",
    "charged_cost_micro_usd",
)


CHUNK = 50_000


@contextlib.contextmanager
def no_statement_timeout(cursor: Any) -> Iterator[None]:
    """This test's own bulk SQL may take longer than the product's statement timeout."""
    cursor.execute("SHOW statement_timeout")
    previous = cursor.fetchone()[0]
    cursor.execute("SET statement_timeout = 0")
    try:
        yield
    finally:
        cursor.execute("SELECT set_config('statement_timeout', %s, false)", [previous])


@pytest.fixture
def workers(
    live_gateway: LiveGateway, services_env: dict[str, str], tmp_path: Path
) -> Iterator[Any]:
    """Start workers on a queue of this test's own; all are stopped afterwards."""
    env = gateway_env(services_env)
    queue = f"proofs-rollup-{uuid.uuid4().hex[:8]}"
    started: list[CeleryWorker] = []

    def start() -> CeleryWorker:
        worker = spawn_worker(env, tmp_path, queue)
        started.append(worker)
        return worker

    start.queue = queue  # type: ignore[attr-defined]
    yield start
    for worker in started:
        worker.stop()


def make_ledger(rows: int, seed: float = 0.42) -> None:
    """`rows` ledger rows over 72 closed hours, four teams, some tagged, some failed.

    Generated inside Postgres (seeded, so every run has the same rows): fifty
    thousand Python objects would take longer to build than the rollup takes to run.
    """
    newest = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    run = uuid.uuid4().hex[:8]
    with connection.cursor() as cursor, no_statement_timeout(cursor):
        cursor.execute("SELECT setseed(%s)", [seed])
        for first in range(0, rows, CHUNK):
            insert_chunk(cursor, first, min(rows, first + CHUNK), run, newest)


def insert_chunk(cursor: Any, first: int, last: int, run: str, newest: datetime) -> None:
    cursor.execute(
        """
            WITH r AS (
              SELECT g, random() AS a, random() AS b, random() AS c, random() AS d,
                     random() AS f, random() AS h, random() AS i, random() AS j,
                     1 + floor(random() * 4000)::bigint AS prompt,
                     floor(random() * 800)::bigint AS completion,
                     floor(random() * 40000)::bigint AS cost
              FROM generate_series(%(first)s + 1, %(last)s) AS g
            )
            INSERT INTO billing_ledgerentry (
              request_id, attempt, kind, team_id, key_id, endpoint, model, deployment_id,
              provider, provider_model, prompt_tokens, completion_tokens, cached_read_tokens,
              cache_write_tokens, reasoning_tokens, usage_estimated, list_cost_micro_usd,
              charged_cost_micro_usd, status, http_status, error_type, cache_hit, is_batch,
              stream, latency_ms, ttft_ms, started_at, ended_at, end_user, tags, created_at)
            SELECT
              'req_proof_' || %(run)s || '_' || g, 1, 'charge',
              (%(teams)s::bigint[])[1 + floor(a * 4)::int],
              (ARRAY[1, 2, 3, NULL]::bigint[])[1 + floor(b * 4)::int],
              'chat.completions',
              (ARRAY['m-a', 'm-b', 'm-c'])[1 + floor(c * 3)::int],
              (ARRAY['d1', 'd2'])[1 + floor(d * 2)::int],
              'openai', '', prompt, completion,
              CASE WHEN f < 0.33 THEN prompt / 2 ELSE 0 END, 0,
              CASE WHEN f > 0.66 THEN completion / 3 ELSE 0 END,
              false, cost, cost * 11 / 10,
              (ARRAY['success', 'success', 'success', 'success', 'success', 'success',
                     'error', 'partial', 'client_disconnected'])[1 + floor(h * 9)::int],
              200, '', false, false, false, 0, NULL,
              %(newest)s - (1 + floor(i * 72 * 3600)) * interval '1 second',
              %(newest)s - (floor(i * 72 * 3600)) * interval '1 second',
              '',
              (ARRAY['[]', '[]', '[]', '["a"]', '["b"]', '["a", "b"]', '["c", "a"]'])
                [1 + floor(j * 7)::int]::jsonb,
              now()
            FROM r
            """,
        {"first": first, "last": last, "run": run, "teams": list(TEAMS), "newest": newest},
    )
    assert cursor.rowcount == last - first


_SUMS = ", ".join(f"sum({name})" for name in METRICS)
_BUCKETS = """
    CROSS JOIN LATERAL (VALUES
      ('hour', date_trunc('hour', e.started_at AT TIME ZONE 'UTC')),
      ('day', date_trunc('day', e.started_at AT TIME ZONE 'UTC'))) AS b(granularity, bucket)
"""
_COUNTS = "count(*), count(*) FILTER (WHERE e.status IN ('error', 'partial'))"


def clean_recomputation() -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Every (granularity, bucket, team, key, model, deployment, tag) bucket, straight from
    the ledger in SQL: independent of the rollup code, which sums in the ORM and Python."""
    untagged = f"""
        SELECT b.granularity, b.bucket, e.team_id, coalesce(e.key_id, 0), e.model,
               e.deployment_id, '', {_COUNTS}, {_SUMS}
        FROM billing_ledgerentry e {_BUCKETS}
        WHERE e.team_id = ANY(%(teams)s)
        GROUP BY 1, 2, 3, 4, 5, 6
    """  # noqa: S608 - constants only
    # A row tagged [a, b] counts once under each distinct tag.
    tagged = f"""
        SELECT b.granularity, b.bucket, e.team_id, coalesce(e.key_id, 0), e.model,
               e.deployment_id, t.tag, {_COUNTS}, {_SUMS}
        FROM billing_ledgerentry e
        CROSS JOIN LATERAL (
          SELECT DISTINCT left(x, 64) AS tag FROM jsonb_array_elements_text(e.tags) AS x
          WHERE x <> '') AS t
        {_BUCKETS}
        WHERE e.team_id = ANY(%(teams)s)
        GROUP BY 1, 2, 3, 4, 5, 6, 7
    """  # noqa: S608 - constants only
    out = {}
    with connection.cursor() as cursor, no_statement_timeout(cursor):
        for query in (untagged, tagged):
            cursor.execute(query, {"teams": list(TEAMS)})
            for row in cursor.fetchall():
                bucket = row[1].replace(tzinfo=UTC)
                out[(row[0], bucket, *row[2:7])] = tuple(int(v or 0) for v in row[7:])
    return out


def stored_rollups() -> dict[tuple[Any, ...], tuple[int, ...]]:
    from billing.models import UsageRollup

    keys = ("granularity", "bucket_start", "team_id", "key_id", "model", "deployment_id", "tag")
    values = ("requests", "errors", *METRICS)
    out = {}
    for row in UsageRollup.objects.filter(team_id__in=TEAMS).values_list(*keys, *values):
        out[(row[0], row[1].astimezone(UTC), *row[2:7])] = tuple(int(v) for v in row[7:])
    return out


def rollup_writer_pids() -> list[int]:
    """Backends (not ours) holding a write lock on the rollup table: a rollup mid-write."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'billing_usagerollup' AND l.mode = 'RowExclusiveLock' "
            "AND l.pid <> pg_backend_pid()"
        )
        return [int(pid) for (pid,) in cursor.fetchall()]


def backend_alive(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return bool(cursor.fetchone()[0])


def unacked_on(broker: Any, queue: str) -> list[bytes]:
    """Delivery tags of messages a worker took from `queue` and never acknowledged."""
    tags = []
    for tag, payload in broker.hgetall("unacked").items():
        _message, _exchange, routing_key = json.loads(payload)
        if routing_key == queue:
            tags.append(tag)
    return tags


def _prove(workers: Any, rows: int) -> None:
    from billing.models import ReconciliationRun, RollupState
    from config.celery import app

    first = workers()  # starts while the ledger is generated
    make_ledger(rows)
    broker = redis.Redis.from_url(app.conf.broker_url)
    wait_ready(first)

    app.send_task("billing.rollups_update", queue=workers.queue)
    writers = wait_for(rollup_writer_pids, 60, 0.01, "the rollup to start writing")
    first.kill9()  # mid-rollup: its transaction is writing buckets right now

    # Postgres notices the dead client and rolls its transaction back, whole.
    wait_for(lambda: not any(backend_alive(pid) for pid in writers), 30, 0.05, "the backend")
    assert RollupState.objects.filter(cutoff__isnull=False).count() == 0, (
        "the rollup committed before the kill: it was not killed mid-run"
    )
    assert stored_rollups() == {}, "a killed rollup left part of its work behind"
    # The task was never acknowledged: the broker still holds it for redelivery.
    pending = unacked_on(broker, workers.queue)
    assert len(pending) == 1, pending

    # Fast-forward the broker's visibility timeout; a new worker restores the message
    # when it starts polling, and runs the rollup again.
    timeout = app.conf.broker_transport_options["visibility_timeout"]
    for tag in pending:
        broker.zadd("unacked_index", {tag: time.time() - timeout - 60})
    wait_ready(workers())
    wait_for(
        lambda: RollupState.objects.filter(cutoff__isnull=False).exists(),
        90,
        0.2,
        "the redelivered rollup to finish",
    )
    assert unacked_on(broker, workers.queue) == []

    expected, stored = clean_recomputation(), stored_rollups()
    missing = {k: v for k, v in expected.items() if stored.get(k) != v}
    extra = {k: v for k, v in stored.items() if k not in expected}
    assert not missing and not extra, (
        f"{len(missing)} buckets differ from the ledger, {len(extra)} extra; e.g. "
        f"{list(missing.items())[:3]} {list(extra.items())[:3]}"
    )
    assert sum(v[0] for k, v in expected.items() if k[0] == "hour" and k[6] == "") == rows

    before = ReconciliationRun.objects.count()
    app.send_task("billing.rollups_reconcile", kwargs={"hours": 80}, queue=workers.queue)
    run = wait_for(
        lambda: (
            ReconciliationRun.objects.order_by("-id").first()
            if ReconciliationRun.objects.count() > before
            else None
        ),
        60,
        0.2,
        "the reconciliation",
    )
    assert run.ok and run.differences == [], run.differences
    hours_per_team = {(k[1], k[2]) for k in expected if k[0] == "hour"}
    assert run.buckets_checked >= len(hours_per_team)


def test_a_rollup_killed_mid_run_is_redelivered_and_the_rollups_stay_exact(workers):
    _prove(workers, rows=50_000)


@pytest.mark.soak
def test_soak_a_rollup_over_300k_rows_killed_mid_run_stays_exact(workers):
    _prove(workers, rows=300_000)
