"""A durable local queue for ledger rows while Postgres is unreachable.

A response must never reach a client without its ledger row surviving a crash.
When the insert fails (Postgres down or timing out), the row is appended to a
spool file and fsync'd before the response continues, so it is durable on this
host. Spooled rows are replayed into the ledger once Postgres answers again;
the ledger's unique (request_id, attempt) makes a replay that runs twice harmless.

Several processes share one spool directory (every web worker, and the host's
other containers through a volume), so every step holds an exclusive flock on the
file it touches:

- A writer appends whole lines under the lock and fsyncs before releasing it. It
  opened the file by name before it had the lock, so once it has it, it checks
  that the name still points at the inode it holds: if a replayer claimed (renamed)
  the file meanwhile, it opens the name again rather than append to a file that
  was already read and is about to be deleted.
- A replayer claims a file by renaming it while holding the lock, reads it and
  deletes it still holding it: it never sees half an append, and no append can
  land after its read. A claimed file whose replayer died (nobody holds its lock)
  is taken over at once.
- A short write is continued until the whole payload is written; if the disk
  refuses the rest, the partial line is cut off again and the error raised, so
  rows are never reported durable when they are not.
- A torn line (a crash mid-append before this process could cut it) is skipped,
  logged as "torn spool line" and kept in `torn/` for an operator; it never
  blocks the valid rows around it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import threading
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

# Threads of one process append one at a time (the flock orders processes).
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
    record = AttemptRecord(**data)
    record.to_model()  # a row the ledger would refuse must not block the others either
    return record


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not renamed or deleted since)."""
    held = os.fstat(fd)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return held.st_nlink > 0 and (held.st_ino, held.st_dev) == (named.st_ino, named.st_dev)


def _write_all(fd: int, payload: bytes) -> None:
    """Write every byte: os.write may write less than asked (a full disk, a size limit)."""
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"spool write made no progress ({len(view)} bytes left)")
        view = view[written:]


def spool(records: list[AttemptRecord]) -> None:
    """Append rows to this process's spool file and fsync them: durable on return."""
    path = spool_dir() / f"ledger-{os.getpid()}.jsonl"
    payload = "".join(_encode(r) + "\n" for r in records).encode()
    with _lock:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, path):
                    continue  # claimed by a replayer while we waited: open the name again
                _append(fd, payload)
                return
            finally:
                os.close(fd)  # releases the lock


def _append(fd: int, payload: bytes) -> None:
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        # A process with our pid died mid-append: start on a fresh line, so the torn
        # line stays one line (skipped on replay) instead of swallowing our first row.
        payload = b"\n" + payload
    try:
        _write_all(fd, payload)
        os.fsync(fd)
    except OSError:
        # Never leave half a row behind for a replayer; the caller hears the failure.
        os.ftruncate(fd, size)
        raise


def pending() -> bool:
    try:
        directory = spool_dir()
        return any(directory.glob("ledger-*.jsonl")) or any(directory.glob("claimed-*.jsonl"))
    except OSError:
        return False


def replay() -> int:
    """Move spooled rows into the ledger. Returns how many rows were replayed."""
    directory = spool_dir()
    replayed = 0
    for path in sorted(directory.glob("ledger-*.jsonl")):
        replayed += _claim_and_replay(path, directory / f"claimed-{uuid.uuid4().hex}-{path.name}")
    # Claims left by a replayer that died (a live one holds the lock until it deletes).
    for claimed in sorted(directory.glob("claimed-*.jsonl")):
        replayed += _claim_and_replay(claimed, None)
    return replayed


def _claim_and_replay(path: Path, claim_as: Path | None) -> int:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0  # another process took it
    try:
        try:
            # Never wait: a writer holds it for one append, a live replayer for its
            # whole replay; either way the next pass gets it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        if not _same_file(fd, path):
            return 0  # claimed (or replayed and deleted) by another process meanwhile
        if claim_as is not None:
            path.rename(claim_as)
            path = claim_as
        return _replay_file(fd, path)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _replay_file(fd: int, path: Path) -> int:
    """Insert a claimed file's rows (its lock held) and delete it."""
    records: list[AttemptRecord] = []
    torn: list[bytes] = []
    for number, line in enumerate(_read_all(fd).split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_decode(line.decode()))
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning(
                "skipped a torn spool line: %s line %d (%d bytes, %s); kept in torn/",
                path.name,
                number,
                len(line),
                type(exc).__name__,
            )
            torn.append(line)
    # Raises while Postgres is still down: the file stays, claimed, for a later try.
    ledger_write(records)
    if torn:
        _keep_torn(path, torn)
    path.unlink(missing_ok=True)
    if records:
        logger.info("replayed %d spooled ledger rows from %s", len(records), path.name)
    return len(records)


def _keep_torn(path: Path, lines: list[bytes]) -> None:
    """Torn lines, kept for an operator (not replayed: they are not whole rows)."""
    directory = path.parent / "torn"
    directory.mkdir(exist_ok=True)
    target = directory / f"{path.stem}-{uuid.uuid4().hex[:8]}.jsonl"
    target.write_bytes(b"".join(line + b"\n" for line in lines))


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
