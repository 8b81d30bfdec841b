"""The ledger's one entry point for the data plane: `record(attempt)`.

Every provider attempt (and every cache hit) becomes one ledger row through here:

    record → price it (list cost, the team's markup, whether a cache hit is billed)
      → group commit (billing.writer) → Postgres, or the durable spool while it is down
      → a per-process replayer that moves spooled rows into Postgres once it is back

The caller hears the charged amount only once the row is committed or fsync'd to the
spool, so a response is never complete without its row.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from decimal import Decimal

from django.conf import settings

from billing import spool
from billing.ledger import AttemptRecord
from billing.pricing import FREE, Prices, charged_cost_micro_usd, list_cost_micro_usd
from billing.writer import ledger_writer
from core.db import run_db

logger = logging.getLogger(__name__)

REPLAY_INTERVAL_SECONDS = 5.0
_replayer: asyncio.Task[None] | None = None
# Rows spooled by a process that died before replaying them are picked up by the
# next process, on its first ledger write.
_spool_checked_at_start = False


def cache_hit_prices(prices: Prices | None) -> Prices:
    """The prices a cache hit is reserved and billed at: FREE unless hits are billed
    (GATEWAY_CACHE_BILL_HITS) and the answering deployment is known."""
    if prices is None or not settings.GATEWAY_CACHE_BILL_HITS:
        return FREE
    return prices


def batch_markup(markup_percent: Decimal) -> Decimal:
    """The markup of a Batch API line run live: the team's markup with the emulated batch
    discount (GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT, default 0: full price) applied to
    the marked-up price. The provider is paid its live price either way, which the row
    keeps as its list cost, so a subsidy shows as charged below list."""
    discount = Decimal(str(settings.GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT))
    factor = (Decimal(100) + markup_percent) * (Decimal(100) - discount) / Decimal(100)
    return factor - Decimal(100)


async def record(attempt: AttemptRecord, *, prices: Prices | None, markup_percent: Decimal) -> int:
    """Price `attempt` and write its ledger row (in Postgres or, while it is down, in the
    durable spool). Returns what the row charged, in micro-USD, once it is durable.

    `prices` is None when no deployment was reached: the row records the attempt and
    costs nothing. The row's cost fields are filled in here, the one place they are set.
    """
    global _spool_checked_at_start
    usage = attempt.usage
    if prices is not None and not (attempt.cache_hit and not settings.GATEWAY_CACHE_BILL_HITS):
        attempt.list_cost_micro_usd = list_cost_micro_usd(usage, prices)
        attempt.charged_cost_micro_usd = charged_cost_micro_usd(usage, prices, markup_percent)
    else:
        attempt.list_cost_micro_usd = attempt.charged_cost_micro_usd = 0
    inserted = await ledger_writer.write(attempt)
    if not inserted:
        _start_replayer()
    elif not _spool_checked_at_start:
        _spool_checked_at_start = True
        if await run_db(spool.pending):
            _start_replayer()
    return attempt.charged_cost_micro_usd


def _start_replayer() -> None:
    """One background loop per process moves spooled rows into Postgres once it is back."""
    global _replayer
    if _replayer is None or _replayer.done():
        _replayer = asyncio.get_running_loop().create_task(
            _replay_until_empty(), context=contextvars.Context()
        )


async def _replay_until_empty() -> None:
    while True:
        await asyncio.sleep(REPLAY_INTERVAL_SECONDS)
        try:
            await run_db(spool.replay)
        except Exception as exc:  # still down: try again next interval
            logger.info("ledger spool replay deferred: %s", type(exc).__name__)
            continue
        if not await run_db(spool.pending):
            return
