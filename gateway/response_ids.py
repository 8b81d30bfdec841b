"""The Responses API ids the gateway handed out, with their team and context size.

A Responses request naming a `previous_response_id` makes the provider prepend that
response's whole context (its input and its output) to the new input, and bill it.
The gateway therefore only forwards ids it issued itself, to the same team (another
team's id, or one it never saw, is a 404 as OpenAI answers for an unknown id), and
adds the stored context size to the prompt it reserves and rate-limits.

Entries live in Redis (in the process on the embedded default) for 30 days, how
long OpenAI keeps a stored response.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from django.conf import settings

from accounts.auth import KeyPrincipal
from billing.pricing import Usage
from core import redis_client
from core.errors import GatewayError

logger = logging.getLogger(__name__)

TTL_SECONDS = 30 * 24 * 3600
_LOCAL_MAX = 50_000
_local: OrderedDict[str, tuple[str, float]] = OrderedDict()
ENDPOINT = "responses"


def _storage(response_id: str) -> str:
    return f"gw:rid:{response_id}"


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(
        f"Previous response with id '{response_id}' not found. Use the id of a response "
        "your team received through this gateway in the last 30 days.",
        404,
        "invalid_request_error",
        "previous_response_not_found",
        "previous_response_id",
    )


def _unavailable() -> GatewayError:
    return GatewayError(
        "The previous response cannot be looked up right now (Redis did not answer); "
        "retry shortly.",
        503,
        "server_error",
        "previous_response_unavailable",
        headers={"retry-after": "1"},
    )


async def remember(
    endpoint: str, principal: KeyPrincipal, body: dict[str, Any], answer: Any, usage: Usage
) -> None:
    """Record a Responses answer so the same team may continue from it."""
    if endpoint != ENDPOINT or body.get("store") is False or not isinstance(answer, dict):
        return  # an unstored response cannot be continued: nothing to remember
    response_id = answer.get("id")
    if not isinstance(response_id, str) or not response_id:
        return
    # The provider's input count already includes any context this turn carried.
    value = f"{principal.team_id}:{usage.prompt_tokens + usage.completion_tokens}"
    if not settings.REDIS_URL:
        _local[response_id] = (value, time.monotonic() + TTL_SECONDS)
        _local.move_to_end(response_id)
        while len(_local) > _LOCAL_MAX:
            _local.popitem(last=False)
        return
    try:
        await redis_client.guarded(
            redis_client.client().set(_storage(response_id), value, ex=TTL_SECONDS)
        )
    except redis_client.RedisUnavailable:
        # The answer is billed and delivered; only continuing from it will be refused.
        logger.warning("response id %s not recorded: Redis unavailable", response_id)


async def context_tokens(endpoint: str, principal: KeyPrincipal, body: dict[str, Any]) -> int:
    """Tokens a `previous_response_id` carries into this request; 404 if not the team's."""
    if endpoint != ENDPOINT:
        return 0
    response_id = body.get("previous_response_id")
    if response_id is None:
        return 0
    if not isinstance(response_id, str) or not response_id:
        raise _not_found(str(response_id))
    raw: Any
    if settings.REDIS_URL:
        try:
            raw = await redis_client.guarded(redis_client.client().get(_storage(response_id)))
        except redis_client.RedisUnavailable as exc:
            raise _unavailable() from exc
    else:
        found = _local.get(response_id)
        raw = found[0] if found and found[1] > time.monotonic() else None
    if raw is None:
        raise _not_found(response_id)
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    team, _, tokens = text.partition(":")
    if team != str(principal.team_id):
        # Indistinguishable from an unknown id: another team learns nothing.
        raise _not_found(response_id)
    return int(tokens)
