"""A durable local queue for ledger rows while Postgres is unreachable.

A response must never reach a client without its ledger row surviving a crash.
When the insert fails (Postgres down or timing out), the row is appended to a
spool file and fsync'd before the response continues, so it is durable on this
host. Spooled rows are replayed into the ledger once Postgres answers again;
the ledger's unique (request_id, attempt) makes a replay that runs twice harmless.

Files are claimed for replay by an atomic rename, so several worker processes
can share one spool directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, router

from billing.ledger import AttemptRecord, ledger_write
from billing.models import LedgerEntry
from billing.pricing import Usage

logger = logging.getLogger(__name__)

# A claimed file older than this is assumed abandoned by a crashed replayer.
STALE_CLAIM_SECONDS = 120
_lock = threading.Lock()


def spool_dir() -> Path:
    path = Path(settings.GATEWAY_LEDGER_SPOOL_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _encode(record: AttemptRecord) -> str:
    data = dataclasses.asdict(record)
    data["started_at"] = record.started_at.isoformat()
    data["ended_at"] = record.ended_at.isoformat()
    return json.dumps(data, separators=(",", ":"))


def _decode(line: str) -> AttemptRecord:
    data: dict[str, Any] = json.loads(line)
    data["usage"] = Usage(**data["usage"])
    data["started_at"] = datetime.fromisoformat(data["started_at"])
    data["ended_at"] = datetime.fromisoformat(data["ended_at"])
    return AttemptRecord(**data)


def spool(records: list[AttemptRecord]) -> None:
    """Append rows to this process's spool file and fsync them: durable on return."""
    path = spool_dir() / f"ledger-{os.getpid()}.jsonl"
    payload = "".join(_encode(r) + "\n" for r in records).encode()
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)


def pending() -> bool:
    try:
        return any(spool_dir().iterdir())
    except OSError:
        return False


def replay() -> int:
    """Move spooled rows into the ledger. Returns how many rows were replayed."""
    directory = spool_dir()
    replayed = 0
    for path in sorted(directory.glob("ledger-*.jsonl")):
        claimed = directory / f"claimed-{uuid.uuid4().hex}-{path.name}"
        try:
            with _lock:
                path.rename(claimed)
        except FileNotFoundError:
            continue  # another process took it
        replayed += _replay_file(claimed)
    now = time.time()
    for claimed in directory.glob("claimed-*.jsonl"):
        try:
            if now - claimed.stat().st_mtime > STALE_CLAIM_SECONDS:
                replayed += _replay_file(claimed)
        except FileNotFoundError:
            continue
    return replayed


def _replay_file(path: Path) -> int:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [_decode(line) for line in lines]
    # Raises while Postgres is still down: the file stays, claimed, for a later try.
    ledger_write(records)
    path.unlink(missing_ok=True)
    if records:
        logger.info("replayed %d spooled ledger rows from %s", len(records), path.name)
    return len(records)


def write_or_spool(records: list[AttemptRecord]) -> bool:
    """Insert the rows, or spool them durably if Postgres fails. True if inserted."""
    try:
        try:
            ledger_write(records)
        except (OperationalError, InterfaceError):
            # Often just a connection that died with a Postgres restart: one more try
            # on a fresh connection before falling back to the spool.
            connections[router.db_for_write(LedgerEntry)].close()
            ledger_write(records)
        return True
    except Exception as exc:  # any database failure: the rows must not be lost
        logger.warning(
            "ledger insert failed (%s); spooling %d rows", type(exc).__name__, len(records)
        )
        spool(records)
        return False
