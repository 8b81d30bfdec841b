"""Red team, bad-key floods and logins: the negative key cache, login throttling,
TLS settings from the environment, and the audit of users and role grants.

Bad keys: a gateway whose key lookups are observed at Postgres. While the test holds
an exclusive lock on the key table, any lookup that reaches Postgres blocks (and ends
in 503 database_unavailable), and pg_stat_activity shows it waiting; an answer from
the negative cache is an immediate 401. So "this request asked the database" is seen
from outside, without touching the gateway's code.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from django.conf import settings

from tests.support.live import ROOT, settings_at_start_up

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


def _key_gateway(spawn_gateway: Any, negative_seconds: float) -> Any:
    return spawn_gateway(
        # Known keys stay cached through the whole test: only bad keys reach Postgres.
        GATEWAY_KEY_CACHE_SECONDS="120",
        GATEWAY_KEY_NEGATIVE_CACHE_SECONDS=str(negative_seconds),
        GATEWAY_KEY_NEGATIVE_CACHE_ENTRIES=str(NEGATIVE_ENTRIES),
        # A lookup stuck behind the test's lock gives up quickly.
        GATEWAY_DB_TIMEOUT_SECONDS="0.5",
    )


@pytest.fixture
def key_gateway(spawn_gateway: Any) -> Any:
    # Misses are remembered far longer than a test takes, however slow the machine.
    return _key_gateway(spawn_gateway, 120)


@pytest.fixture
def short_gateway(spawn_gateway: Any) -> Any:
    return _key_gateway(spawn_gateway, NEGATIVE_SECONDS)


def test_it_answers_a_repeated_bad_key_without_asking_the_database(
    key_gateway: Any, make_key: Any
) -> None:
    good = make_key()
    assert _models(key_gateway, good.secret).status_code == 200
    bad = _bad_secret()
    assert _models(key_gateway, bad).status_code == 401

    with key_table_locked():
        # Thirty answers without one query: a query would wait on the lock, then 503.
        for _ in range(30):
            response = _models(key_gateway, bad)
            assert response.status_code == 401, response.text
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
    short_gateway: Any, make_key: Any
) -> None:
    from accounts.models import KeySecret
    from core.crypto import hash_key_secret

    issued = make_key()
    secret = _bad_secret()
    missed_at = time.monotonic()
    assert _models(short_gateway, secret).status_code == 401
    # The secret becomes valid (as a rotation would add it) right after the miss.
    KeySecret.objects.create(key=issued.key, secret_hash=hash_key_secret(secret), last4=secret[-4:])
    remembered = _models(short_gateway, secret).status_code
    if time.monotonic() - missed_at < NEGATIVE_SECONDS - 0.5:  # unless the machine stalled
        assert remembered == 401  # still the remembered miss
    while _models(short_gateway, secret).status_code != 200:
        assert time.monotonic() - missed_at < NEGATIVE_SECONDS + 2, "the miss outlived its TTL"
        time.sleep(0.1)


# --- dashboard logins are throttled ----------------------------------------------------------

PASSWORD = "correct horse battery staple 42"
FAILURE_LIMIT = 5  # GATEWAY_LOGIN_FAILURE_LIMIT's default, which the shared gateway runs with
_CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


def _login(base_url: str, username: str, password: str, source: str = "127.0.0.1") -> int:
    """One real POST to /login/ (CSRF included) from the given source address."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=base_url, transport=transport, timeout=30) as client:
        page = client.get("/login/")
        match = _CSRF_FIELD.search(page.text)
        assert match, page.text[:300]
        response = client.post(
            "/login/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": match[1]},
        )
        if response.status_code == 302:
            assert "sessionid" in client.cookies
        return response.status_code


def test_it_locks_out_a_username_from_an_address_after_repeated_failures(
    live_gateway: Any,
) -> None:
    from django.contrib.auth.models import User

    name = f"alice-{uuid.uuid4().hex[:8]}"
    other = f"bob-{uuid.uuid4().hex[:8]}"
    User.objects.create_user(name, "alice@example.com", PASSWORD)
    User.objects.create_user(other, "bob@example.com", PASSWORD)

    answers = [_login(live_gateway.url, name, f"guess {i}") for i in range(FAILURE_LIMIT)]
    assert answers[:-1] == [200] * (FAILURE_LIMIT - 1)  # the form, with its error
    assert answers[-1] == 429
    # Locked: even the right password no longer signs in from there.
    assert _login(live_gateway.url, name, PASSWORD) == 429
    # The pair is locked, not the person: elsewhere alice signs in, and bob still can here.
    assert _login(live_gateway.url, name, PASSWORD, source="127.0.0.2") == 302
    assert _login(live_gateway.url, other, PASSWORD) == 302


# --- TLS settings from the environment ---------------------------------------------------------


def test_it_sends_hsts_and_secure_cookies_behind_a_tls_proxy(spawn_gateway: Any) -> None:
    gateway = spawn_gateway(
        GATEWAY_TRUST_X_FORWARDED_PROTO="1",
        GATEWAY_SSL_REDIRECT="1",
        GATEWAY_HSTS_SECONDS="31536000",
        GATEWAY_SECURE_COOKIES="1",
    )
    plain = httpx.get(f"{gateway.url}/login/", timeout=30)
    assert plain.status_code == 301
    assert plain.headers["location"].startswith("https://")
    secure = httpx.get(f"{gateway.url}/login/", headers={"x-forwarded-proto": "https"}, timeout=30)
    assert secure.status_code == 200
    assert secure.headers["strict-transport-security"] == "max-age=31536000"
    cookie = secure.headers.get("set-cookie", "")
    assert "csrftoken=" in cookie and "Secure" in cookie
    # Health checks and the data plane are never redirected (no SecurityMiddleware there).
    assert httpx.get(f"{gateway.url}/health/live", timeout=30).status_code == 200


_TLS_PROBE = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps([getattr(s, 'SECURE_PROXY_SSL_HEADER', None), s.SECURE_SSL_REDIRECT, "
    "s.SECURE_HSTS_SECONDS, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE]))"
)


def _start_up(**env: str) -> subprocess.CompletedProcess[str]:
    return settings_at_start_up(_TLS_PROBE, **env)


def test_it_reads_the_tls_settings_from_the_environment_and_refuses_bad_values() -> None:
    # Production defaults: secure cookies; a client's X-Forwarded-Proto is not believed.
    assert json.loads(_start_up().stdout) == [None, False, 0, True, True]
    behind_proxy = _start_up(
        GATEWAY_TRUST_X_FORWARDED_PROTO="yes", GATEWAY_SSL_REDIRECT="1", GATEWAY_HSTS_SECONDS="60"
    )
    assert json.loads(behind_proxy.stdout) == [
        ["HTTP_X_FORWARDED_PROTO", "https"],
        True,
        60,
        True,
        True,
    ]
    bad = _start_up(GATEWAY_HSTS_SECONDS="a year")
    assert bad.returncode != 0 and "GATEWAY_HSTS_SECONDS='a year'" in bad.stderr
    preload = _start_up(GATEWAY_HSTS_PRELOAD="1", GATEWAY_HSTS_SECONDS="60")
    assert preload.returncode != 0 and "GATEWAY_HSTS_PRELOAD=1 needs" in preload.stderr
    bool_typo = _start_up(GATEWAY_TRUST_X_FORWARDED_PROTO="https")
    assert bool_typo.returncode != 0 and "GATEWAY_TRUST_X_FORWARDED_PROTO" in bool_typo.stderr


# --- users and role grants are audited -------------------------------------------------------


def _entries(object_type: str, object_id: int) -> list[Any]:
    from core.models import AuditEntry

    return list(
        AuditEntry.objects.filter(object_type=object_type, object_id=str(object_id)).order_by("id")
    )


def test_it_audits_every_user_creation_and_role_grant_through_the_dashboard(
    live_gateway: Any, make_team: Any
) -> None:
    from django.contrib.auth.models import User

    from accounts.models import Membership
    from tests.support.dashboard import dashboard_login, dashboard_post

    root_name = f"root-{uuid.uuid4().hex[:8]}"
    User.objects.create_superuser(root_name, "root@example.com", PASSWORD)
    root = dashboard_login(live_gateway.url, root_name, PASSWORD)

    name = f"carol-{uuid.uuid4().hex[:8]}"
    created = dashboard_post(
        root,
        "/users/",
        {
            "username": name,
            "email": "c@example.com",
            "password": PASSWORD,
            "platform_role": "finance",
        },
    )
    assert created.status_code == 302, created.text[:500]
    carol = User.objects.get(username=name)
    for role in ("admin", ""):
        assert (
            dashboard_post(root, f"/users/{carol.id}/role/", {"platform_role": role}).status_code
            == 302
        )
    entries = _entries("user", carol.id)
    assert [(e.action, e.actor) for e in entries] == [("create", root_name)] + [
        ("update", root_name)
    ] * 2
    assert entries[0].before is None and entries[0].after["platform_role"] == "finance"
    assert (entries[1].before["platform_role"], entries[1].after["platform_role"]) == (
        "finance",
        "admin",
    )
    assert (entries[2].before["platform_role"], entries[2].after["platform_role"]) == ("admin", "")
    assert not [e for e in entries if "pbkdf2" in json.dumps([e.before, e.after])]

    # Team roles: grant, change, remove.
    team = make_team()
    assert (
        dashboard_post(
            root, f"/teams/{team.id}/members/add/", {"username": name, "role": "admin"}
        ).status_code
        == 302
    )
    membership = Membership.objects.get(team=team, user=carol)
    dashboard_post(root, f"/teams/{team.id}/members/add/", {"username": root_name, "role": "admin"})
    path = f"/teams/{team.id}/members/{membership.id}"
    assert dashboard_post(root, f"{path}/role/", {"role": "member"}).status_code == 302
    assert dashboard_post(root, f"{path}/remove/", {}).status_code == 302
    grants = _entries("membership", membership.id)
    assert [(e.action, e.actor, e.team_id) for e in grants] == [
        (action, root_name, team.id) for action in ("create", "update", "delete")
    ]
    assert grants[0].after["role"] == "admin"
    assert (grants[1].before["role"], grants[1].after["role"]) == ("admin", "member")
    assert grants[2].before["role"] == "member" and grants[2].after is None


def test_it_audits_a_user_created_outside_the_dashboard(live_gateway: Any) -> None:
    from django.contrib.auth.models import User

    name = f"ops-{uuid.uuid4().hex[:8]}"
    env = {**live_gateway.env, "DJANGO_SUPERUSER_PASSWORD": PASSWORD}
    subprocess.run(
        [
            sys.executable,
            "manage.py",
            "createsuperuser",
            "--noinput",
            "--username",
            name,
            "--email",
            "ops@example.com",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    user = User.objects.get(username=name)
    [entry] = _entries("user", user.id)
    assert entry.action == "create" and entry.actor == "outside-dashboard"
    assert entry.after["platform_role"] == "admin" and entry.before is None
