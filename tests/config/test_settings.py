"""Settings read the environment once and fail loudly, naming the variable, on bad values.

Each case starts a fresh Python with an environment built from scratch, so nothing
from the test process (its DATABASE_URL, its SECRET_KEY, the fact that pytest is
imported) can mask what a real start-up would do. The start-ups run in parallel,
once per module, and each test reads the outcome of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.live import ROOT

PROBE = """
import json, sys
assert "pytest" not in sys.modules
import django
django.setup()
from django.conf import settings
db = settings.DATABASES["default"]
print(json.dumps({
    "engine": db["ENGINE"],
    "name": str(db["NAME"]),
    "user": db.get("USER"),
    "password": db.get("PASSWORD"),
    "host": db.get("HOST"),
    "port": db.get("PORT"),
    "options": db.get("OPTIONS", {}),
    "cache_backend": settings.CACHES["default"]["BACKEND"],
    "cache_location": settings.CACHES["default"].get("LOCATION"),
    "eager": settings.CELERY_TASK_ALWAYS_EAGER,
    "native_batches": settings.GATEWAY_NATIVE_BATCHES,
    "broker": settings.CELERY_BROKER_URL,
    "debug": settings.DEBUG,
    "secret_key_set": bool(settings.SECRET_KEY),
    "max_body": settings.GATEWAY_MAX_BODY_BYTES,
    "batch_discount": settings.GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT,
}, default=str))
"""

SECRET = {"SECRET_KEY": "a-long-random-test-secret-for-settings-tests-0123456789"}

# Every start-up this module makes: name → the gateway variables in its environment.
CASES: dict[str, dict[str, str]] = {
    "bare": {},
    "debug-off-no-secret": {"GATEWAY_DEBUG": "0"},
    "debug-no-secret": {"GATEWAY_DEBUG": "1"},
    "secret": {**SECRET},
    "db-mysql": {"DATABASE_URL": "mysql://u:p@db.example.com:3306/gateway", **SECRET},
    "db-sqlite-url": {"DATABASE_URL": "sqlite:///tmp/x.db", **SECRET},
    "db-no-name": {"DATABASE_URL": "postgres://u:p@h:5/", **SECRET},
    "db-postgres": {"DATABASE_URL": "postgres://u:p@h:5/db", **SECRET},
    "db-escaped": {"DATABASE_URL": "postgresql://us%40er:p%3Ass@db.internal/my%20db", **SECRET},
    "body-abc": {"GATEWAY_MAX_BODY_BYTES": "abc", **SECRET},
    "body-float": {"GATEWAY_MAX_BODY_BYTES": "1.5", **SECRET},
    "body-negative": {"GATEWAY_MAX_BODY_BYTES": "-1", **SECRET},
    "body-2048": {"GATEWAY_MAX_BODY_BYTES": "2048", **SECRET},
    "redis-http": {"REDIS_URL": "http://x", **SECRET},
    "redis-no-scheme": {"REDIS_URL": "localhost:6379", **SECRET},
    "redis": {"REDIS_URL": "redis://cache.internal:6379/2", **SECRET},
    "debug-maybe": {"GATEWAY_DEBUG": "maybe", **SECRET},
    "discount-101": {"GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT": "101", **SECRET},
    "discount-abc": {"GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT": "abc", **SECRET},
    "discount-25": {"GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT": "25", **SECRET},
    "discount-old-name": {"GATEWAY_BATCH_DISCOUNT_PERCENT": "50", **SECRET},
}


@dataclass
class Outcome:
    env: dict[str, str]
    var_dir: Path
    returncode: int
    stdout: str
    stderr: str

    def settings(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stderr[-3000:]
        return dict(json.loads(self.stdout.strip().splitlines()[-1]))

    def error(self) -> str:
        """The final exception line of a start-up that must fail."""
        assert self.returncode != 0, f"start-up succeeded with {self.env}: {self.stdout}"
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        last = lines[-1]
        # The message itself must name the variable: the traceback's source lines
        # mention every variable anyway, so only the exception line counts.
        assert last.startswith("django.core.exceptions.ImproperlyConfigured:"), self.stderr[-3000:]
        return last


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    started = {}
    for name, extra in CASES.items():
        home = tmp_path_factory.mktemp(f"settings-{name}")
        env = {
            # Only what a Python process needs to run; every gateway variable is explicit.
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "GATEWAY_VAR_DIR": str(home / "var"),
            "HOME": str(home),
            **extra,
        }
        process = subprocess.Popen(
            [sys.executable, "-c", PROBE],
            cwd=home,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[name] = (process, env, home / "var")
    results = {}
    try:
        for name, (process, env, var_dir) in started.items():
            stdout, stderr = process.communicate(timeout=120)
            results[name] = Outcome(env, var_dir, process.returncode, stdout, stderr)
        yield results
    finally:
        for process, _, _ in started.values():
            if process.poll() is None:
                process.kill()


def test_it_refuses_to_start_without_a_secret_key(outcomes):
    assert "SECRET_KEY" in outcomes["bare"].error()


def test_it_refuses_to_start_without_a_secret_key_when_debug_is_off(outcomes):
    assert "SECRET_KEY" in outcomes["debug-off-no-secret"].error()


def test_it_starts_without_a_secret_key_in_debug(outcomes):
    settings = outcomes["debug-no-secret"].settings()

    assert settings["debug"] is True
    assert settings["secret_key_set"] is True


def test_it_starts_with_a_secret_key(outcomes):
    assert outcomes["secret"].settings()["debug"] is False


@pytest.mark.parametrize("case", ["db-mysql", "db-sqlite-url", "db-no-name"])
def test_it_names_a_database_url_it_cannot_use(outcomes, case):
    assert "DATABASE_URL" in outcomes[case].error()


@pytest.mark.parametrize("case", ["body-abc", "body-float", "body-negative"])
def test_it_names_a_bad_max_body_size(outcomes, case):
    assert "GATEWAY_MAX_BODY_BYTES" in outcomes[case].error()


def test_it_reads_the_max_body_size(outcomes):
    assert outcomes["body-2048"].settings()["max_body"] == 2048


def test_it_defaults_the_max_body_size_to_8_mib(outcomes):
    assert outcomes["secret"].settings()["max_body"] == 8 * 1024 * 1024


@pytest.mark.parametrize("case", ["redis-http", "redis-no-scheme"])
def test_it_names_a_redis_url_it_cannot_use(outcomes, case):
    assert "REDIS_URL" in outcomes[case].error()


def test_it_names_a_debug_flag_that_is_not_a_boolean(outcomes):
    assert "GATEWAY_DEBUG" in outcomes["debug-maybe"].error()


def test_it_runs_embedded_without_database_or_redis(outcomes):
    outcome = outcomes["secret"]
    settings = outcome.settings()

    assert settings["engine"] == "django.db.backends.sqlite3"
    assert settings["name"].startswith(str(outcome.var_dir))
    assert settings["cache_backend"] == "django.core.cache.backends.locmem.LocMemCache"
    assert settings["eager"] is True
    # Nothing would poll a provider's batch (no beat): batches run live, to the end.
    assert settings["native_batches"] is False


def test_it_uses_postgres_with_a_pool_from_database_url(outcomes):
    settings = outcomes["db-postgres"].settings()

    assert settings["engine"] == "django.db.backends.postgresql"
    assert (settings["name"], settings["user"], settings["password"]) == ("db", "u", "p")
    assert (settings["host"], str(settings["port"])) == ("h", "5")
    pool = settings["options"].get("pool")
    assert isinstance(pool, dict) and pool.get("max_size", 0) >= 1, settings["options"]


def test_it_decodes_escaped_credentials_in_database_url(outcomes):
    settings = outcomes["db-escaped"].settings()

    assert (settings["user"], settings["password"]) == ("us@er", "p:ss")
    assert settings["name"] == "my db"
    assert str(settings["port"]) == "5432"


def test_it_uses_redis_for_cache_and_celery_from_redis_url(outcomes):
    settings = outcomes["redis"].settings()

    assert settings["cache_backend"] == "django.core.cache.backends.redis.RedisCache"
    assert settings["cache_location"] == "redis://cache.internal:6379/2"
    assert settings["eager"] is False
    assert settings["native_batches"] is True
    assert settings["broker"] == "redis://cache.internal:6379/2"


@pytest.mark.parametrize("case", ["discount-101", "discount-abc"])
def test_it_names_a_bad_emulated_batch_discount(outcomes, case):
    assert "GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT" in outcomes[case].error()


def test_it_charges_live_batch_lines_full_price_unless_a_discount_is_set(outcomes):
    assert outcomes["secret"].settings()["batch_discount"] == 0
    assert outcomes["discount-25"].settings()["batch_discount"] == 25


def test_it_refuses_the_old_batch_discount_setting_rather_than_ignore_it(outcomes):
    error = outcomes["discount-old-name"].error()
    assert "GATEWAY_BATCH_DISCOUNT_PERCENT" in error
    assert "GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT" in error
