"""Issue #12, item 7: no long CPU work on the event loop; per-stream memory is bounded.

One uvicorn worker serves every request with one event loop. An attacker's 8 MB
prompt must not stall the other requests of that worker while its tokens are
counted, and a client reading a long stream slowly must not make the gateway hold
the whole stream in memory.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.support.live import LiveGateway

pytestmark = pytest.mark.e2e

WORDS = ["alpha", "beta", "gamma", "delta", "lorem", "ipsum", "x1", "zz", "token", "budget"]


def _big_prompt(size: int) -> str:
    # Varied words, so the tokenizer does real work (deterministic for repeatability).
    rng = random.Random(12)
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


async def _probe(
    client: httpx.AsyncClient, secret: str, model: str, stop: asyncio.Event
) -> list[float]:
    """Small requests, one after another, until `stop`: their latencies in seconds."""
    latencies: list[float] = []
    small = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    turn = 0
    while not stop.is_set():
        began = time.perf_counter()
        if turn % 2:
            response = await client.get("/health/live")
        else:
            response = await client.post(
                "/v1/chat/completions", json=small, headers={"authorization": f"Bearer {secret}"}
            )
        latencies.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text[:300]
        turn += 1
        await asyncio.sleep(0.01)
    return latencies


def test_it_keeps_serving_small_requests_while_an_8mb_prompt_is_counted(
    live_gateway: LiveGateway, make_model: Any, make_key: Any
) -> None:
    model = make_model()
    secret = make_key().secret
    # Just under the 8 MiB body limit, in two messages (both are counted).
    half = _big_prompt(3_900_000)
    big = orjson.dumps(
        {
            "model": model.name,
            "messages": [{"role": "system", "content": half}, {"role": "user", "content": half}],
            "max_tokens": 5,
        }
    )
    assert 7_000_000 < len(big) < 8 * 1024 * 1024

    async def run() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(base_url=live_gateway.url, timeout=120) as client:
            stop = asyncio.Event()
            # Warm both paths first, so no first-use cost lands inside the measurement.
            warm = asyncio.create_task(_probe(client, secret, model.name, stop))
            await asyncio.sleep(0.3)
            stop.set()
            await warm
            stop.clear()
            probes = asyncio.create_task(_probe(client, secret, model.name, stop))
            await asyncio.sleep(0.2)
            began = time.perf_counter()
            response = await client.post(
                "/v1/chat/completions",
                content=big,
                headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
            )
            elapsed = time.perf_counter() - began
            assert response.status_code == 200, response.text[:300]
            stop.set()
            return elapsed, await probes

    elapsed, latencies = asyncio.run(run())
    assert len(latencies) >= 5, latencies
    worst = max(latencies)
    # Before the fix the count held the loop for most of the big request's time, so
    # the worst small request waited nearly as long as the big one took.
    assert worst < 0.3 * elapsed, (
        f"a small request waited {worst:.3f}s while the 8 MB request took {elapsed:.3f}s "
        f"(latencies: {sorted(latencies)[-5:]})"
    )


# --- per-stream memory --------------------------------------------------------------------------

LONG_CHUNKS = 40_000
LONG_TOKENS = 80_000


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _ledger_row(request_id: str) -> Any:
    from billing.models import LedgerEntry

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = LedgerEntry.objects.filter(request_id=request_id).first()
        if row is not None:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


def _count_streamed_text(model: str, raw: bytes) -> int:
    """What the whole generated text counts to, in one go (the gateway counts it in folds)."""
    import litellm

    parts: list[str] = []
    for line in raw.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:]).get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
    return int(litellm.token_counter(model=model, text="".join(parts)))


def _open_stream(gateway: LiveGateway, secret: str, model: str) -> tuple[socket.socket, bytes]:
    parts = urlsplit(gateway.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    body = orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "go on"}], "stream": True}
    )
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {parts.hostname}\r\n"
        f"authorization: Bearer {secret}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1024)
    return sock, head


@pytest.mark.parametrize("usage", ["reported", "not reported"])
def test_it_does_not_buffer_a_long_stream_for_a_slow_client(
    spawn_gateway: Any, make_model: Any, make_key: Any, usage: str
) -> None:
    """Without usage from the provider the gateway counts the text itself, folding it as
    it goes instead of keeping every event: the count must still cover all of it."""
    gateway = spawn_gateway()
    controls = f";chunks={LONG_CHUNKS};output_tokens={LONG_TOKENS}"
    if usage == "not reported":
        controls += ";no_usage=1"
    provider_model = f"openai/long-{time.time_ns()}{controls}"
    model = make_model(provider_model=provider_model)
    short = make_model()
    secret = make_key().secret
    # Warm the stream path, so its first-use cost is in the baseline.
    sock, warm = _open_stream(gateway, secret, short.name)
    while not warm.endswith(b"0\r\n\r\n"):
        data = sock.recv(65536)
        if not data:
            break
        warm += data
    sock.close()
    time.sleep(0.5)
    baseline = _rss_kib(gateway.process.pid)

    sock, head = _open_stream(gateway, secret, model.name)
    assert head.startswith(b"HTTP/1.1 200"), head[:300]
    request_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    # The client stalls while the provider streams as fast as it can.
    peak = baseline
    for _ in range(40):
        time.sleep(0.15)
        peak = max(peak, _rss_kib(gateway.process.pid))
    grown_mib = (peak - baseline) / 1024
    # Then it reads everything: the stream is whole and billed in full.
    received = bytearray()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        received += data
        if received.endswith(b"0\r\n\r\n"):
            break
    sock.close()
    assert b"data: [DONE]" in received, bytes(received[-300:])
    row = _ledger_row(request_id)
    assert row.status == "success"
    if usage == "reported":
        assert row.completion_tokens == LONG_TOKENS
    else:
        expected = _count_streamed_text(provider_model, bytes(received))
        assert abs(row.completion_tokens - expected) <= expected // 100, (
            row.completion_tokens,
            expected,
        )
    assert grown_mib < 8, (
        f"the gateway grew by {grown_mib:.1f} MiB while its client paused a "
        f"{len(received) >> 20} MiB stream"
    )
