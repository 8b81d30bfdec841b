"""Promise: the ledger spool is safe across processes (billing/spool.py).

While Postgres is down, every gateway process appends its ledger rows to a spool file
and any process replays them later. The attacks:

- a crash mid-append leaves a torn line: replay must insert every valid row, skip the
  torn one and report it, never stall behind it;
- appenders in several processes while another process replays: a replayer must never
  read a file half-written, nor delete rows a writer appended after it read (a writer
  holding an fd to a file that was renamed under it): every row lands exactly once;
- a short write (the disk or a file-size limit cuts the append): the spool must not
  report rows durable that are not, nor leave half a row behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.live import ROOT, gateway_env
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def _row(request_id: str, team_id: int = 424242) -> dict[str, Any]:
    """A spool line as billing.spool writes it (a dataclasses.asdict of AttemptRecord)."""
    started = datetime.now(UTC) - timedelta(seconds=2)
    return {
        "request_id": request_id,
        "attempt": 1,
        "team_id": team_id,
        "key_id": None,
        "endpoint": "chat.completions",
        "model": "spooled",
        "status": "success",
        "started_at": started.isoformat(),
        "ended_at": (started + timedelta(seconds=1)).isoformat(),
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "list_cost_micro_usd": 7,
        "charged_cost_micro_usd": 7,
    }


def test_a_torn_line_is_skipped_and_reported_and_never_blocks_replay(
    spawn_gateway: Any, make_model: Any, make_key: Any, tmp_path: Path
) -> None:
    """A crash left a torn line in the middle of one file and at the end of another.

    A gateway started on that spool replays it on its first ledger write: every valid
    row reaches Postgres, the torn ones are logged and kept aside, and nothing is left
    pending.
    """
    from billing.models import LedgerEntry

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    valid = [f"req_spool_{uuid.uuid4().hex}" for _ in range(5)]
    lines = [json.dumps(_row(r)) for r in valid]
    torn_end = json.dumps(_row("req_torn_end"))[:57]  # killed mid-write: no newline
    torn_middle = json.dumps(_row("req_torn_middle"))[:40]
    # A dead process's file (pid 1 is never a gateway worker) and a stale claim.
    (spool_dir / "ledger-1.jsonl").write_text("\n".join(lines[:3]) + "\n" + torn_end)
    (spool_dir / "claimed-0abc-ledger-2.jsonl").write_text(
        lines[3] + "\n" + torn_middle + "\n" + lines[4] + "\n"
    )

    gateway = spawn_gateway(GATEWAY_LEDGER_SPOOL_DIR=str(spool_dir))
    model = make_model()
    created = make_key()
    response = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": model.name, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {created.secret}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text

    def replayed() -> bool:
        return LedgerEntry.objects.filter(request_id__in=valid).count() == len(valid)

    wait_for(replayed, 20, 0.2, f"the valid spooled rows to be replayed; log:\n{gateway.log()}")
    assert not LedgerEntry.objects.filter(request_id__in=["req_torn_end", "req_torn_middle"])
    # Reported: a warning naming the file, and the torn bytes kept for an operator.
    wait_for(lambda: not list(spool_dir.glob("*ledger-*.jsonl")), 10, 0.2, "the spool to drain")
    log = gateway.log()
    assert log.count("torn spool line") == 2, log[-3000:]
    kept = "".join(p.read_text() for p in (spool_dir / "torn").iterdir())
    assert torn_end in kept and torn_middle in kept


WRITER = textwrap.dedent(
    """
    import sys
    import django
    django.setup()
    from datetime import UTC, datetime, timedelta
    from billing import spool
    from billing.ledger import AttemptRecord
    from billing.pricing import Usage

    prefix, batches, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    now = datetime.now(UTC) - timedelta(seconds=5)
    for b in range(batches):
        spool.spool([
            AttemptRecord(
                request_id=f"{prefix}-{b}-{i}", attempt=1, team_id=424243, key_id=None,
                endpoint="chat.completions", model="spooled", status="success",
                started_at=now, ended_at=now, usage=Usage(3, 4),
                # Long rows, so an append spans many pages and a read can land mid-write.
                end_user="u" * 600,
            )
            for i in range(size)
        ])
    """
)

REPLAYER = textwrap.dedent(
    """
    import os, sys, time
    import django
    django.setup()
    from billing import spool

    stop = sys.argv[1]
    while not os.path.exists(stop):
        spool.replay()
    spool.replay()
    """
)


def test_appenders_in_several_processes_and_a_replayer_lose_no_row(
    live_gateway: Any, services_env: dict[str, str], tmp_path: Path
) -> None:
    from billing.models import LedgerEntry

    spool_dir = tmp_path / "spool"
    env = gateway_env(services_env, GATEWAY_LEDGER_SPOOL_DIR=str(spool_dir))
    stop = tmp_path / "stop"
    writers, batches, size = 4, 30, 100
    prefixes = [f"req_conc_{uuid.uuid4().hex[:10]}" for _ in range(writers)]
    replayer = subprocess.Popen(
        [sys.executable, "-c", REPLAYER, str(stop)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, p, str(batches), str(size)],
                cwd=ROOT,
                env=env,
                stderr=subprocess.PIPE,
            )
            for p in prefixes
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        stop.touch()
    _, err = replayer.communicate(timeout=60)
    assert replayer.returncode == 0, err.decode()[-3000:]

    expected = {f"{p}-{b}-{i}" for p in prefixes for b in range(batches) for i in range(size)}
    found = list(
        LedgerEntry.objects.filter(team_id=424243, request_id__startswith="req_conc_")
        .filter(request_id__regex="^(" + "|".join(prefixes) + ")-")
        .values_list("request_id", flat=True)
    )
    assert len(found) == len(set(found))  # exactly once (the unique constraint says so too)
    missing = expected - set(found)
    assert not missing, (
        f"{len(missing)} of {len(expected)} rows lost; spool left: "
        f"{sorted(p.name for p in spool_dir.iterdir())}; replayer: {err.decode()[-2000:]}"
    )
    assert not list(spool_dir.glob("*ledger-*.jsonl"))


SHORT_WRITER = textwrap.dedent(
    """
    import os, resource, signal, sys
    import django
    django.setup()
    from datetime import UTC, datetime
    from billing import spool
    from billing.ledger import AttemptRecord

    # Past the limit a write fails with EFBIG instead of killing us with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    now = datetime.now(UTC)
    def rows(tag, n):
        return [
            AttemptRecord(request_id=f"{tag}-{i}", attempt=1, team_id=1, key_id=None,
                          endpoint="e", model="m", status="success", started_at=now,
                          ended_at=now, end_user="x" * 200)
            for i in range(n)
        ]
    spool.spool(rows("first", 2))
    path = spool.spool_dir() / f"ledger-{os.getpid()}.jsonl"
    size = path.stat().st_size
    # The next append gets 100 bytes of room: the kernel writes those and returns short.
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
    try:
        spool.spool(rows("second", 3))
    except OSError as exc:
        print("raised", exc.errno)
    else:
        print("returned")
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    # After the failure the spool still takes rows, on a clean line boundary.
    spool.spool(rows("third", 1))
    print(path)
    """
)


def test_a_short_write_is_never_reported_durable_nor_leaves_half_a_row(
    live_gateway: Any, services_env: dict[str, str], tmp_path: Path
) -> None:
    """RLIMIT_FSIZE makes the kernel really cut the append short (no patched os.write)."""
    import errno

    spool_dir = tmp_path / "spool"
    env = gateway_env(services_env, GATEWAY_LEDGER_SPOOL_DIR=str(spool_dir))
    done = subprocess.run(
        [sys.executable, "-c", SHORT_WRITER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    outcome, path = done.stdout.decode().split("\n")[:2]
    # The spool retried the rest of the write, hit the limit, and said so: the caller
    # knows the rows are not durable (the writer then fails the request loudly).
    assert outcome == f"raised {errno.EFBIG}", outcome
    lines = Path(path).read_text().split("\n")
    assert lines[-1] == ""  # ends on a line boundary
    ids = [json.loads(line)["request_id"] for line in lines[:-1]]  # every line is whole
    assert ids == ["first-0", "first-1", "third-0"]


LATE_WRITER = textwrap.dedent(
    """
    import sys
    import django
    django.setup()
    from datetime import UTC, datetime
    from billing import spool
    from billing.ledger import AttemptRecord

    now = datetime.now(UTC)
    print("ready", flush=True)
    sys.stdin.readline()
    spool.spool([AttemptRecord(request_id="late", attempt=1, team_id=1, key_id=None,
                               endpoint="e", model="m", status="success", started_at=now,
                               ended_at=now)])
    """
)


def test_a_writer_whose_file_is_claimed_while_it_waits_reopens_by_name(
    services_env: dict[str, str], tmp_path: Path
) -> None:
    """The rename race, made deterministic: a replayer holds the lock of a writer's file
    and claims it (renames it) while the writer, in another process, has already opened
    it and waits for the lock. The writer must append to a fresh file, not to the claimed
    one the replayer has read and is about to delete."""
    import fcntl

    from django.test import override_settings

    from billing import spool

    env = gateway_env(services_env, GATEWAY_LEDGER_SPOOL_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", LATE_WRITER],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        path = tmp_path / f"ledger-{proc.pid}.jsonl"
        path.write_text("")
        fd = os.open(path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a replayer holds while it claims and reads
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        time.sleep(1.5)  # the writer opens the file and waits for the lock
        claimed = tmp_path / f"claimed-x-{path.name}"
        path.rename(claimed)
        os.close(fd)  # releases the lock
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert claimed.read_text() == "", "the writer appended to a file already claimed"
    assert '"late"' in path.read_text()
    with override_settings(GATEWAY_LEDGER_SPOOL_DIR=str(tmp_path)):
        assert spool.pending()
