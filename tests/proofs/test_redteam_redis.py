"""Red team, Redis is bounded: every key expires, and no team can fill the cache stores.

A live gateway runs with its three Redis roles on three databases of one server
(budgets, response cache, broker), the way docker-compose splits them into instances.
After a representative flow (budgets of each kind, rate limits, a deployment limit,
streams, cache hits, idempotent repeats) every key it left must have a TTL, except the
reservation index, a long-lived structure whose members the admission script sweeps.
Then one team floods the response cache and the idempotency store: it stays within its
caps, in entries and bytes, and another team's entries survive.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import pytest
import redis

from tests.support.live import settings_at_start_up

pytestmark = pytest.mark.e2e


# Long-lived structures whose members (not the keys) are swept: reservations of requests
# that died are released by the next admission (billing/admission.py).
IMMORTAL_ALLOWED = {b"gw:res:exp", b"gw:res:val"}
CACHE_ENTRIES, CACHE_BYTES = 5, 6_000
IDEM_ENTRIES, IDEM_BYTES = 5, 8_000
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def _db_url(base: str, db: int) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


@pytest.fixture
def split_redis(services_env: dict[str, str]) -> Iterator[dict[str, redis.Redis]]:
    base = services_env["REDIS_URL"]
    roles = {"budget": 11, "cache": 12, "broker": 13}
    clients = {role: redis.Redis.from_url(_db_url(base, db)) for role, db in roles.items()}
    for client in clients.values():
        client.flushdb()
    yield clients
    for client in clients.values():
        client.flushdb()
        client.close()


@pytest.fixture
def split_gateway(spawn_gateway: Any, services_env: dict[str, str], split_redis: Any) -> Any:
    base = services_env["REDIS_URL"]
    return spawn_gateway(
        REDIS_URL=_db_url(base, 11),
        GATEWAY_BUDGET_REDIS_URL=_db_url(base, 11),
        GATEWAY_CACHE_REDIS_URL=_db_url(base, 12),
        CELERY_BROKER_URL=_db_url(base, 13),
        GATEWAY_CACHE_MAX_ENTRIES_PER_TEAM=str(CACHE_ENTRIES),
        GATEWAY_CACHE_MAX_BYTES_PER_TEAM=str(CACHE_BYTES),
        GATEWAY_IDEMPOTENCY_MAX_ENTRIES_PER_TEAM=str(IDEM_ENTRIES),
        GATEWAY_IDEMPOTENCY_MAX_BYTES_PER_TEAM=str(IDEM_BYTES),
    )


def _keys(client: redis.Redis, pattern: str = "*") -> list[bytes]:
    return list(client.scan_iter(match=pattern, count=1000))


def _immortal(client: redis.Redis) -> list[bytes]:
    return [key for key in _keys(client) if client.ttl(key) == -1 and key not in IMMORTAL_ALLOWED]


def test_it_leaves_no_key_without_a_ttl_and_keeps_each_role_on_its_own_redis(
    split_gateway: Any,
    split_redis: dict[str, redis.Redis],
    make_model: Any,
    make_key: Any,
    make_team: Any,
) -> None:
    model = make_model(rpm_limit=10_000, tpm_limit=10_000_000)
    team = make_team(budget_micro_usd=10_000_000, budget_period="monthly", rpm_limit=1000)
    credit = make_key(team=team, max_budget_micro_usd=5_000_000, budget_period="total")
    daily = make_key(
        team=team, max_budget_micro_usd=5_000_000, budget_period="daily", tpm_limit=10**6
    )
    for issued in (credit, daily):
        client = openai.OpenAI(base_url=split_gateway.v1, api_key=issued.secret, max_retries=0)
        client.chat.completions.create(model=model.name, messages=MESSAGES, max_tokens=20)
        for _ in client.chat.completions.create(
            model=model.name, messages=MESSAGES, max_tokens=20, stream=True
        ):
            pass
        for _ in range(2):  # a miss that stores, then a hit
            client.chat.completions.create(
                model=model.name,
                messages=[{"role": "user", "content": "cache me"}],
                max_tokens=20,
                extra_headers={"x-gateway-cache": "on"},
            )
        idempotency_key = f"idem-{uuid.uuid4()}"
        for _ in range(2):  # a first run, then a replay
            client.chat.completions.create(
                model=model.name,
                messages=MESSAGES,
                max_tokens=20,
                extra_headers={"idempotency-key": idempotency_key},
            )

    budget, cache = split_redis["budget"], split_redis["cache"]
    assert _immortal(budget) == []
    assert _immortal(cache) == []
    budget_keys = _keys(budget)
    # The flow really wrote what it should, where it should.
    assert any(k.startswith(b"gw:bud:k:") for k in budget_keys), budget_keys
    assert any(k.startswith(b"gw:bud:t:") for k in budget_keys), budget_keys
    assert any(k.startswith(b"gw:rl:") for k in budget_keys), budget_keys
    assert any(k.startswith(b"gw:dep:") for k in budget_keys), budget_keys
    assert any(k.startswith(b"gw:idem:") for k in budget_keys), budget_keys
    assert not [k for k in budget_keys if k.startswith(b"gw:cache")], budget_keys
    cache_keys = _keys(cache)
    assert any(k.startswith(b"gw:cache:") for k in cache_keys), cache_keys
    assert all(k.startswith(b"gw:cache:") for k in cache_keys), cache_keys


async def _cached_flood(base_url: str, secret: str, model: str, count: int) -> list[str]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=secret, max_retries=0) as client:

        async def one(i: int) -> str:
            response = await client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": f"flood {i}"}],
                max_tokens=20,
                extra_headers={"x-gateway-cache": "on"},
            )
            return response.headers.get("x-gateway-cache", "miss")

        return await asyncio.gather(*(one(i) for i in range(count)))


def _team_bytes(clients: dict[str, redis.Redis], pattern: str) -> tuple[int, int]:
    """How many entries match, and their bytes, wherever they landed."""
    count = size = 0
    for client in clients.values():
        keys = _keys(client, pattern)
        count += len(keys)
        size += sum(int(client.strlen(k)) + len(k) for k in keys)
    return count, size


def test_it_caps_a_teams_response_cache_without_evicting_another_team(
    split_gateway: Any, split_redis: dict[str, redis.Redis], make_model: Any, make_key: Any
) -> None:
    model = make_model()
    name = f"big-{uuid.uuid4().hex[:8]}"
    big_model = make_model(name=name, provider_model=f"openai/{name};output_tokens=4000")
    victim, flooder = make_key(), make_key()
    victim_client = openai.OpenAI(base_url=split_gateway.v1, api_key=victim.secret, max_retries=0)
    victim_messages: list[Any] = [{"role": "user", "content": "keep me"}]

    def victim_call() -> str:
        response = victim_client.chat.completions.with_raw_response.create(
            model=model.name,
            messages=victim_messages,
            max_tokens=20,
            extra_headers={"x-gateway-cache": "on"},
        )
        return response.headers.get("x-gateway-cache", "miss")

    assert victim_call() == "miss"
    assert victim_call() == "hit"

    asyncio.run(_cached_flood(split_gateway.v1, flooder.secret, model.name, 60))

    count, size = _team_bytes(split_redis, f"gw:cache:{flooder.key.team_id}:*")
    assert 0 < count <= CACHE_ENTRIES
    assert size <= CACHE_BYTES
    # A full cache still takes the team's newest answer and serves it.
    fresh = openai.OpenAI(base_url=split_gateway.v1, api_key=flooder.secret, max_retries=0)
    for expected in ("miss", "hit"):
        response = fresh.chat.completions.with_raw_response.create(
            model=model.name,
            messages=[{"role": "user", "content": "fresh"}],
            max_tokens=20,
            extra_headers={"x-gateway-cache": "on"},
        )
        assert response.headers.get("x-gateway-cache", "miss") == expected
    assert victim_call() == "hit"

    # An answer bigger than the whole byte cap is not stored at all, and evicts nothing.
    before = _team_bytes(split_redis, f"gw:cache:{flooder.key.team_id}:*")
    big = httpx.post(
        f"{split_gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {flooder.secret}", "x-gateway-cache": "on"},
        json={"model": big_model.name, "messages": MESSAGES, "max_tokens": 4000},
        timeout=30,
    )
    assert big.status_code == 200, big.text
    assert len(big.content) > CACHE_BYTES
    assert _team_bytes(split_redis, f"gw:cache:{flooder.key.team_id}:*") == before


async def _idempotent_flood(base_url: str, secret: str, model: str, count: int) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=secret, max_retries=0) as client:
        await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=model,
                    messages=MESSAGES,
                    max_tokens=20,
                    extra_headers={"idempotency-key": f"flood-{i}"},
                )
                for i in range(count)
            )
        )


def test_it_caps_a_teams_idempotency_keys_without_evicting_another_team(
    split_gateway: Any,
    split_redis: dict[str, redis.Redis],
    make_model: Any,
    make_key: Any,
    mock_upstream: Any,
) -> None:
    model = make_model()
    victim, flooder = make_key(), make_key()
    client = openai.OpenAI(base_url=split_gateway.v1, api_key=victim.secret, max_retries=0)
    first = client.chat.completions.create(
        model=model.name, messages=MESSAGES, max_tokens=20, extra_headers={"idempotency-key": "v1"}
    )

    asyncio.run(_idempotent_flood(split_gateway.v1, flooder.secret, model.name, 60))

    count, size = _team_bytes(split_redis, f"gw:idem:{flooder.key.id}:*")
    assert 0 < count <= IDEM_ENTRIES
    assert size <= IDEM_BYTES
    calls = mock_upstream.calls(model.name)
    again = client.chat.completions.create(
        model=model.name, messages=MESSAGES, max_tokens=20, extra_headers={"idempotency-key": "v1"}
    )
    assert again.id == first.id
    assert mock_upstream.calls(model.name) == calls


_PROBE = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps([s.GATEWAY_BUDGET_REDIS_URL, s.GATEWAY_CACHE_REDIS_URL, "
    "s.CELERY_BROKER_URL, s.CACHES['default'].get('LOCATION')]))"
)


def _start_up(**env: str) -> subprocess.CompletedProcess[str]:
    return settings_at_start_up(_PROBE, **env)


def test_it_gives_each_redis_role_its_own_url_defaulting_to_redis_url() -> None:
    base = "redis://r:6379/0"
    same = _start_up(REDIS_URL=base)
    assert json.loads(same.stdout) == [base, base, base, base]

    split = _start_up(
        REDIS_URL=base,
        GATEWAY_BUDGET_REDIS_URL="redis://budgets:6379/0",
        GATEWAY_CACHE_REDIS_URL="redis://cache:6379/0",
        CELERY_BROKER_URL="redis://budgets:6379/1",
    )
    assert json.loads(split.stdout) == [
        "redis://budgets:6379/0",
        "redis://cache:6379/0",
        "redis://budgets:6379/1",
        "redis://cache:6379/0",  # Django's own cache is disposable too
    ]

    bad = _start_up(REDIS_URL=base, GATEWAY_CACHE_REDIS_URL="http://cache")
    assert bad.returncode != 0 and "GATEWAY_CACHE_REDIS_URL has scheme 'http'" in bad.stderr
    alone = _start_up(GATEWAY_BUDGET_REDIS_URL="redis://budgets:6379/0")
    assert alone.returncode != 0 and "set REDIS_URL too" in alone.stderr


def test_it_caps_each_team_in_the_in_process_stores_too(
    spawn_gateway: Any, make_model: Any, make_key: Any, mock_upstream: Any
) -> None:
    """The embedded default (no Redis) keeps the same per-team caps, in the process."""
    gateway = spawn_gateway(
        REDIS_URL="",
        GATEWAY_CACHE_MAX_ENTRIES_PER_TEAM=str(CACHE_ENTRIES),
        GATEWAY_IDEMPOTENCY_MAX_ENTRIES_PER_TEAM=str(IDEM_ENTRIES),
    )
    model = make_model()
    victim, flooder = make_key(), make_key()

    def cached(secret: str, text: str) -> str:
        client = openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)
        response = client.chat.completions.with_raw_response.create(
            model=model.name,
            messages=[{"role": "user", "content": text}],
            max_tokens=20,
            extra_headers={"x-gateway-cache": "on"},
        )
        return response.headers.get("x-gateway-cache", "miss")

    assert cached(victim.secret, "keep me") == "miss"
    for i in range(CACHE_ENTRIES + 1):
        assert cached(flooder.secret, f"flood {i}") == "miss"
    # The flooder's oldest answer made room for its newest; the victim kept theirs.
    assert cached(flooder.secret, f"flood {CACHE_ENTRIES}") == "hit"
    assert cached(flooder.secret, "flood 0") == "miss"
    assert cached(victim.secret, "keep me") == "hit"

    def idempotent(secret: str, key: str) -> str:
        client = openai.OpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)
        return client.chat.completions.create(
            model=model.name,
            messages=MESSAGES,
            max_tokens=20,
            extra_headers={"idempotency-key": key},
        ).id

    first = idempotent(victim.secret, "victim")
    flood = [idempotent(flooder.secret, f"flood-{i}") for i in range(IDEM_ENTRIES + 1)]
    calls = mock_upstream.calls(model.name)
    assert idempotent(victim.secret, "victim") == first  # a replay: no new provider call
    assert idempotent(flooder.secret, f"flood-{IDEM_ENTRIES}") == flood[-1]
    assert mock_upstream.calls(model.name) == calls
    # The flooder's oldest key was evicted: its repeat runs again.
    assert idempotent(flooder.secret, "flood-0") != flood[0]
