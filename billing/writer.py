"""Group commit for ledger rows written by the data plane.

Every request waits until its row is committed (or durably spooled) before its
response completes. Rows that arrive while a write is in flight join the next
one, so under load many requests share one INSERT and one commit instead of each
paying a round trip and a thread hand-off; an idle gateway still writes at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from billing import spool
from billing.ledger import AttemptRecord
from core.db import run_db

logger = logging.getLogger(__name__)

# A batch never grows past this, so one INSERT stays small.
MAX_BATCH = 200


class GroupWriter:
    def __init__(self) -> None:
        self._pending: list[tuple[AttemptRecord, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def write(self, record: AttemptRecord) -> bool:
        """Wait until `record` is in the ledger (True) or in the durable spool (False)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a writer never outlives its event loop
            self._pending, self._flusher, self._loop = [], None, loop
        done: asyncio.Future[bool] = loop.create_future()
        self._pending.append((record, done))
        if self._flusher is None or self._flusher.done():
            # A fresh context: the flush serves many requests and outlives each.
            self._flusher = loop.create_task(self._flush(), context=contextvars.Context())
        # Shielded: a request cancelled while waiting still gets its row written.
        return await asyncio.shield(done)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                inserted = await run_db(spool.write_or_spool, [record for record, _ in batch])
            except BaseException as exc:  # even the spool failed: every waiter must hear it
                logger.exception("ledger write and spool both failed for %d rows", len(batch))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else RuntimeError())
                if not isinstance(exc, Exception):
                    raise
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(inserted)


ledger_writer = GroupWriter()
