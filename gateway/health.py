"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse

from core.db import run_db
from core.http import json_response


async def live(request: HttpRequest) -> HttpResponse:
    return json_response({"status": "ok"})


def _db_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _redis_ping() -> None:
    import redis.asyncio as aioredis

    # The budget Redis: without it keys with a budget or limit are refused. The
    # response cache's Redis is optional (a miss is served without it).
    client = aioredis.Redis.from_url(
        settings.GATEWAY_BUDGET_REDIS_URL,
        socket_timeout=settings.REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=settings.REDIS_TIMEOUT_SECONDS,
    )
    try:
        await asyncio.wait_for(client.ping(), settings.REDIS_TIMEOUT_SECONDS * 2)
    finally:
        await client.aclose()


async def ready(request: HttpRequest) -> HttpResponse:
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(run_db(_db_ping), settings.DB_TIMEOUT_SECONDS)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    if settings.REDIS_URL:
        try:
            await _redis_ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return json_response(
        {"status": "ok" if healthy else "unavailable", "checks": checks}, 200 if healthy else 503
    )
