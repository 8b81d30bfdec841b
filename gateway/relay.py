"""The stream relay: provider SSE events to the client, and the stream's ledger row.

A stream's row is written before its end marker (`data: [DONE]`, `message_stop`,
`response.completed`) is sent, so a stream a client has fully received is billed even
if the process is killed right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime

from billing import admission
from billing.models import LedgerStatus
from billing.pricing import Usage, micro_usd_to_str
from core.errors import GatewayError
from gateway import breaker, failures, idempotency, response_cache, response_ids, upstream
from gateway.call import Call, attempt_row, record
from gateway.dialects import Tracker, count_text, stream_text
from gateway.routing import Deployment, RoutingTable

logger = logging.getLogger(__name__)

# Streams whose client left keep being read for this long, so that what the
# provider generated (and will bill us for) is known and billed.
STREAM_DRAIN_SECONDS = 60.0
# Per-stream memory: at most this many events wait for a slow client; past that the
# pump waits too, which slows the provider down (TCP backpressure) instead of
# buffering the whole stream here.
STREAM_QUEUE_EVENTS = 64
# A client that takes nothing for this long (or whose response never started) is
# treated as gone: the pump stops waiting for it and drains and bills the stream.
STREAM_CLIENT_STALL_SECONDS = 60.0
# Raw events are kept only to count the generated text if the provider never reports
# usage; past this many bytes they are folded into a running token count.
STREAM_FOLD_BYTES = 256 * 1024


class StreamRelay:
    """Moves SSE events from the provider to the client, and bills the stream.

    The pump (provider side) and the client side are decoupled by a bounded queue:
    while the client reads slowly the pump waits (backpressure to the provider); if
    the client hangs up, the pump stops waiting and keeps reading (up to
    STREAM_DRAIN_SECONDS) so the provider's own usage count is what gets billed,
    then writes the ledger row.
    """

    def __init__(
        self,
        call: Call,
        table: RoutingTable,
        group: str,
        deployment: Deployment,
        ticket: admission.Ticket,
        handle: upstream.StreamHandle,
        began: datetime,
        tracker: Tracker,
    ) -> None:
        self.call = call
        self.table = table
        self.group = group
        self.deployment = deployment
        self.ticket = ticket
        self.handle = handle
        self.began = began
        self.tracker = tracker
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(STREAM_QUEUE_EVENTS)
        # Everything sent to the client, kept for an idempotent replay or the cache.
        self.sent: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.client_gone = False
        self.delivered = False
        self._drain_deadline: asyncio.Timeout | None = None
        # Events received from the provider, and tokens of the text already folded
        # out of the kept events (see STREAM_FOLD_BYTES).
        self._received = 0
        self._folded_tokens = 0

    async def _send(self, event: bytes) -> None:
        if self.call.claim is not None or self.call.cache_key is not None:
            self.sent.append(event)
        await self._put(event)

    async def _put(self, item: bytes | None) -> None:
        if self.client_gone:
            return  # nobody reads the queue any more
        if not self.queue.full():
            # The usual case, once per event: room in the queue, so no wait and no
            # stall timer to arm and cancel.
            self.queue.put_nowait(item)
            return
        try:
            async with asyncio.timeout(STREAM_CLIENT_STALL_SECONDS):
                await self.queue.put(item)
        except TimeoutError:
            self._client_left()
            # Should the client read again, its response ends (without the end
            # marker, so it cannot pass for a complete answer).
            self.queue.put_nowait(None)

    def _client_left(self) -> None:
        self.client_gone = True
        # Nobody will read what is queued: drop it, which also frees a pump that
        # waits for room in the queue.
        while not self.queue.empty():
            self.queue.get_nowait()
        # Only while the pump still reads (a finished Timeout cannot be rescheduled).
        if self._drain_deadline is not None:
            self._drain_deadline.reschedule(
                asyncio.get_running_loop().time() + STREAM_DRAIN_SECONDS
            )

    async def client_events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    self.delivered = True
                    return
                yield item
        finally:
            if not self.delivered:
                self._client_left()

    async def pump(self) -> None:
        events: list[bytes] = []
        kept_bytes = 0
        failure: upstream.UpstreamError | None = None
        first_byte: datetime | None = None
        ttft_ms: int | None = None
        try:
            async with asyncio.timeout(None) as deadline:
                self._drain_deadline = deadline
                if self.client_gone:
                    self._client_left()
                async for event in self.handle.events:
                    if ttft_ms is None:
                        first_byte = datetime.now()
                        ttft_ms = int((time.monotonic() - self.call.started_mono) * 1000)
                    self._received += 1
                    events.append(event)
                    kept_bytes += len(event)
                    if kept_bytes > STREAM_FOLD_BYTES:
                        # Once the provider reported usage the text is not needed.
                        if self.tracker.usage is None:
                            self._folded_tokens += count_text(
                                self.deployment.provider_model, stream_text(events)
                            )
                        events.clear()
                        kept_bytes = 0
                    forward = self.tracker.feed(event)
                    if forward is not None and not self.client_gone:
                        await self._send(forward)
            if self.tracker.provider_error is not None:
                failure = upstream.UpstreamError(
                    502, upstream.sanitise(self.tracker.provider_error), partial=True
                )
            elif not self.tracker.ended:
                failure = upstream.UpstreamError(
                    502,
                    "The provider's stream ended before it was complete.",
                    "connection",
                    partial=True,
                )
        except upstream.UpstreamError as exc:
            failure = exc
        except TimeoutError:
            failure = upstream.UpstreamError(504, "stream drain timed out", "timeout", partial=True)
        except Exception as exc:  # a bug must still bill and end the stream cleanly
            logger.exception("stream pump failed for %s", self.call.request_id)
            failure = upstream.UpstreamError(502, str(exc), "connection", partial=True)
        finally:
            self._drain_deadline = None  # finished: nothing left to reschedule
            if self.handle.close is not None:
                # Closing a connection that already died may fail; nothing to do then.
                with contextlib.suppress(Exception):
                    await self.handle.close()
        await self._finish(events, failure, first_byte, ttft_ms)

    async def _finish(
        self,
        events: list[bytes],
        failure: upstream.UpstreamError | None,
        first_byte: datetime | None,
        ttft_ms: int | None,
    ) -> None:
        call, deployment, tracker = self.call, self.deployment, self.tracker
        usage = tracker.usage
        estimated = usage is None
        if usage is None and self._received:
            usage = Usage(
                prompt_tokens=call.prompt_tokens,
                completion_tokens=self._folded_tokens
                + count_text(deployment.provider_model, stream_text(events)),
            )
        if self.client_gone:
            status = LedgerStatus.CLIENT_DISCONNECTED
        elif failure is not None:
            status = LedgerStatus.PARTIAL if self._received else LedgerStatus.ERROR
        else:
            status = LedgerStatus.SUCCESS
        row = attempt_row(
            call,
            deployment,
            status=status,
            usage=usage,
            estimated=estimated,
            http_status=200 if failure is None else failure.status,
            error_type=failure.kind if failure else "",
            ttft_ms=ttft_ms,
        )
        written = False
        try:
            await record(call, deployment, row)
            written = True
        except Exception:
            logger.exception("ledger write failed for stream %s", call.request_id)
        try:
            await admission.settle(self.ticket, call.charged_micro_usd)
        except Exception:
            logger.exception("settling reservation failed for %s", call.request_id)
        try:
            if failure is None:
                await breaker.succeeded(
                    self.table,
                    self.group,
                    deployment,
                    stream=True,
                    began=self.began,
                    first_byte=first_byte,
                )
            else:
                await breaker.failed(
                    self.table,
                    self.group,
                    deployment,
                    self.table.policy(self.group),
                    status=failure.status,
                    retry_after=None,
                    counts=True,
                    stream=True,
                    began=self.began,
                )
        except Exception:
            logger.exception("router feedback failed for %s", call.request_id)
        if failure is None and written:
            for event in tracker.finish(micro_usd_to_str(call.charged_micro_usd)):
                await self._send(event)
            await self._remember(usage)
        else:
            if call.claim is not None:
                await idempotency.release(call.claim)
            error = (
                failures.client_error(failure)
                if failure is not None
                else GatewayError(
                    "The response could not be recorded; it was not completed. Retry the request.",
                    503,
                    "server_error",
                    "ledger_unavailable",
                )
            )
            # An error event instead of the end marker: the client sees a failure,
            # never a silently truncated success.
            await self._put(call.endpoint.error_event(error))
        await self._put(None)

    async def _remember(self, usage: Usage | None) -> None:
        call = self.call
        if self.tracker.answer is not None and usage is not None:
            await response_ids.remember(
                call.endpoint.name, call.principal, call.body, self.tracker.answer, usage
            )
        if call.claim is not None:
            await idempotency.complete(
                call.claim, idempotency.Stored(200, self.headers, events=self.sent, stream=True)
            )
        if call.cache_key is not None and usage is not None:
            await response_cache.store(
                call.cache_key,
                response_cache.Entry(
                    body=b"", events=self.sent, deployment_id=self.deployment.id, usage=usage
                ),
            )
