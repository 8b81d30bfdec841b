"""Red team, bad-key floods and logins.

Bad keys: a gateway whose key lookups are observed at Postgres. While the test holds
an exclusive lock on the key table, any lookup that reaches Postgres blocks (and ends
in 503 database_unavailable), and pg_stat_activity shows it waiting; an answer from
the negative cache is an immediate 401. So "this request asked the database" is seen
from outside, without touching the gateway's code.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from django.conf import settings

pytestmark = pytest.mark.e2e

NEGATIVE_SECONDS = 3.0
NEGATIVE_ENTRIES = 50


def _bad_secret() -> str:
    return f"{settings.GATEWAY_KEY_PREFIX}{secrets.token_urlsafe(32)}"


def _pg() -> psycopg.Connection[Any]:
    db = settings.DATABASES["default"]
    return psycopg.connect(
        host=str(db["HOST"]),
        port=str(db["PORT"]),
        dbname=str(db["NAME"]),
        user=str(db["USER"]),
        password=str(db["PASSWORD"]),
    )


@contextmanager
def key_table_locked() -> Iterator[psycopg.Connection[Any]]:
    """Hold an exclusive lock on the key table: every key lookup that reaches Postgres waits."""
    with _pg() as conn:
        conn.execute("LOCK TABLE gateway_keysecret IN ACCESS EXCLUSIVE MODE")
        try:
            yield conn
        finally:
            conn.rollback()


def _lookups_waiting() -> int:
    with _pg() as conn:
        conn.autocommit = True
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query ILIKE '%gateway_keysecret%'"
        ).fetchone()
        return int(row[0]) if row else 0


def _models(gateway: Any, secret: str) -> httpx.Response:
    return httpx.get(
        f"{gateway.v1}/models", headers={"authorization": f"Bearer {secret}"}, timeout=30
    )


@pytest.fixture
def key_gateway(private_gateway: Any) -> Any:
    return private_gateway(
        # Known keys stay cached through the whole test: only bad keys reach Postgres.
        GATEWAY_KEY_CACHE_SECONDS="120",
        GATEWAY_KEY_NEGATIVE_CACHE_SECONDS=str(NEGATIVE_SECONDS),
        GATEWAY_KEY_NEGATIVE_CACHE_ENTRIES=str(NEGATIVE_ENTRIES),
        # A lookup stuck behind the test's lock gives up quickly.
        GATEWAY_DB_TIMEOUT_SECONDS="0.5",
    )


def test_it_answers_a_repeated_bad_key_without_asking_the_database(
    key_gateway: Any, make_key: Any
) -> None:
    good = make_key()
    assert _models(key_gateway, good.secret).status_code == 200
    bad = _bad_secret()
    assert _models(key_gateway, bad).status_code == 401

    with key_table_locked():
        started = time.monotonic()
        for _ in range(30):
            response = _models(key_gateway, bad)
            assert response.status_code == 401, response.text
        # Thirty answers without one query: a query would wait on the lock for a second.
        assert time.monotonic() - started < 3
        assert _models(key_gateway, good.secret).status_code == 200
        # The lock does stop a lookup that reaches Postgres: the proof above can fail.
        fresh = _models(key_gateway, _bad_secret())
        assert fresh.status_code == 503, fresh.text
        assert fresh.json()["error"]["code"] == "database_unavailable"


def test_it_makes_one_query_for_a_burst_of_one_unknown_key(key_gateway: Any, make_key: Any) -> None:
    bad = _bad_secret()
    seen: list[int] = []

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            return [
                r.status_code
                for r in await asyncio.gather(
                    *(
                        client.get(
                            f"{key_gateway.v1}/models", headers={"authorization": f"Bearer {bad}"}
                        )
                        for _ in range(20)
                    )
                )
            ]

    with key_table_locked():
        result: list[list[int]] = []
        sender = threading.Thread(target=lambda: result.append(asyncio.run(burst())))
        sender.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            seen.append(_lookups_waiting())
            time.sleep(0.05)
    sender.join(30)
    assert max(seen) == 1, seen
    # All twenty share the one lookup's outcome (503 if it timed out behind the lock,
    # 401 if it ran again after the lock was released).
    assert len(result[0]) == 20 and len(set(result[0])) == 1 and result[0][0] in (401, 503)


def test_it_keeps_the_negative_cache_bounded_and_never_drops_known_keys(
    key_gateway: Any, make_key: Any
) -> None:
    good = make_key()
    assert _models(key_gateway, good.secret).status_code == 200
    flood = [_bad_secret() for _ in range(NEGATIVE_ENTRIES * 4)]

    async def send_all() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            for start in range(0, len(flood), 20):
                batch = flood[start : start + 20]
                answers = await asyncio.gather(
                    *(
                        client.get(
                            f"{key_gateway.v1}/models", headers={"authorization": f"Bearer {s}"}
                        )
                        for s in batch
                    )
                )
                assert {a.status_code for a in answers} == {401}

    asyncio.run(send_all())
    with key_table_locked():
        # The newest bad keys are remembered; the oldest were let go (memory is bounded).
        assert _models(key_gateway, flood[-1]).status_code == 401
        assert _models(key_gateway, flood[0]).status_code == 503
        # The flood pushed no known key out of its cache.
        assert _models(key_gateway, good.secret).status_code == 200


def test_it_accepts_a_key_issued_after_a_miss_within_the_negative_ttl(
    key_gateway: Any, make_key: Any
) -> None:
    from gateway.crypto import hash_key_secret
    from gateway.models import KeySecret

    issued = make_key()
    secret = _bad_secret()
    missed_at = time.monotonic()
    assert _models(key_gateway, secret).status_code == 401
    # The secret becomes valid (as a rotation would add it) right after the miss.
    KeySecret.objects.create(key=issued.key, secret_hash=hash_key_secret(secret), last4=secret[-4:])
    assert _models(key_gateway, secret).status_code == 401  # still the remembered miss
    while _models(key_gateway, secret).status_code != 200:
        assert time.monotonic() - missed_at < NEGATIVE_SECONDS + 2, "the miss outlived its TTL"
        time.sleep(0.1)
