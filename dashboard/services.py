"""The dashboard's own action: the model test call.

Writes to teams, keys, members, users and platform roles go through
`accounts.services`; to models through `gateway.services`; never here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import GatewayError
from gateway.models import ModelDeployment

if TYPE_CHECKING:
    from gateway.routing import Deployment


# --- the model test button -----------------------------------------------------------------------

TEST_PROMPT = "Reply with one short sentence to confirm you are working."


@dataclass(frozen=True)
class TestResult:
    ok: bool
    latency_ms: int
    answer: str
    detail: str = ""


def deployment_test(*, deployment: ModelDeployment, timeout_seconds: float = 30.0) -> TestResult:
    """One real call to this deployment's provider, outside any team's budget or ledger.

    It goes straight through `gateway.upstream` with the deployment's own settings
    and credential, so it tests exactly what the router would call.
    """
    from gateway import routing, upstream  # imports litellm: only when someone tests

    try:
        target = routing.snapshot(deployment)
    except ValueError as exc:
        return TestResult(False, 0, "", str(exc))
    embedding = target.mode == "embedding"
    started = time.monotonic()
    try:
        # A loop of its own (this runs in a view's worker thread): its connection pool is
        # closed when the call ends, not left for the garbage collector to warn about.
        data = asyncio.run(_call_provider(target, embedding, limit_seconds=timeout_seconds))
    except upstream.UpstreamError as exc:
        return TestResult(False, _ms(started), "", f"{exc.status}: {exc.message}")
    except (TimeoutError, GatewayError) as exc:
        return TestResult(False, _ms(started), "", str(exc) or "The provider did not answer.")
    latency = _ms(started)
    if embedding:
        vectors = data.get("data") or [{}]
        dims = len(vectors[0].get("embedding") or [])
        return TestResult(True, latency, f"An embedding with {dims} dimensions.")
    try:
        answer = str(data["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        answer = ""
    return TestResult(True, latency, answer[:2000] or "(an empty answer)")


async def _call_provider(
    target: Deployment, embedding: bool, *, limit_seconds: float
) -> dict[str, Any]:
    import litellm

    from gateway import upstream

    if embedding:
        body: dict[str, Any] = {"input": ["gateway test"]}
        path, call = "embeddings", litellm.aembedding
    else:
        body = {"messages": [{"role": "user", "content": TEST_PROMPT}], "max_tokens": 64}
        path, call = "chat/completions", litellm.acompletion
    try:
        async with asyncio.timeout(limit_seconds):
            if upstream.is_passthrough(target):
                payload = upstream.passthrough_payload(target, body)
                target_url = upstream.openai_target(target, path)
                answer = await upstream.passthrough_json(target_url, target, payload)
            else:
                answer = await upstream.litellm_json(call, target, body)
    finally:
        await upstream.close_sessions()
    return answer.data


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
