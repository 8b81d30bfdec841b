"""Django settings for the gateway.

Everything configurable comes from the environment through `config.env`, read here
and nowhere else. With no environment at all the gateway runs on embedded
defaults: a SQLite file, the in-process cache and eager Celery. `DATABASE_URL`
and `REDIS_URL` switch to Postgres and Redis.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

from django.core.exceptions import ImproperlyConfigured

from config.env import (
    env_bool,
    env_destinations,
    env_float,
    env_int,
    env_list,
    env_str,
    parse_database_url,
    redis_role_url,
    validate_redis_url,
)

# litellm must never fetch its price map from the internet; set before it is imported.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_TELEMETRY", "False")

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("GATEWAY_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("GATEWAY_DEBUG", False)
TESTING = "pytest" in sys.modules

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if DEBUG or TESTING:
        SECRET_KEY = "insecure-dev-only-secret-key-do-not-use-in-production"  # noqa: S105
    else:
        raise ImproperlyConfigured(
            "SECRET_KEY is required outside debug: set SECRET_KEY to a long random string "
            "(or GATEWAY_DEBUG=1 for local development)."
        )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",
    "axes",
    # The one-way stack, lowest first (pyproject.toml: the import-linter contract).
    "core",
    "accounts",
    "billing",
    "gateway",
    "dashboard",
]

# The full stack, for the dashboard and the management API.
MIDDLEWARE = [
    "gateway.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out login into its 429 answer.
    "axes.middleware.AxesMiddleware",
]
# The data plane (/v1, /health) needs none of sessions, CSRF or messages, and every
# sync middleware costs a thread hop per request under ASGI; see config/asgi.py.
DATA_PLANE_MIDDLEWARE = ["gateway.middleware.RequestIdMiddleware"]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
DB_TIMEOUT_SECONDS = env_float("GATEWAY_DB_TIMEOUT_SECONDS", 3.0, minimum=0.1)
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    _db = parse_database_url(DATABASE_URL)
    DATABASES = {
        "default": {
            "ENGINE": _db.engine,
            "NAME": _db.name,
            "USER": _db.user,
            "PASSWORD": _db.password,
            "HOST": _db.host,
            "PORT": _db.port,
            # Pooled connections are returned at the end of each request; the pool's
            # timeout and the statement timeout mean nothing waits on Postgres forever.
            "CONN_MAX_AGE": 0,
            # After a Postgres restart pooled connections are dead; checking them on
            # checkout replaces them instead of failing one request each.
            "CONN_HEALTH_CHECKS": True,
            "TEST": {"NAME": f"test_{_db.name}"},
            "OPTIONS": {
                **_db.options,
                "connect_timeout": max(1, round(DB_TIMEOUT_SECONDS)),
                "options": f"-c statement_timeout={int(DB_TIMEOUT_SECONDS * 1000) * 2}",
                "pool": {
                    "min_size": 1,
                    "max_size": env_int("GATEWAY_DB_POOL_SIZE", 10, minimum=1),
                    "timeout": DB_TIMEOUT_SECONDS,
                },
            },
        }
    }
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("GATEWAY_SQLITE_PATH", str(VAR_DIR / "gateway.sqlite3")),
            "OPTIONS": {
                # WAL lets the dashboard read while the data plane writes the ledger;
                # IMMEDIATE takes the write lock up front instead of failing mid-transaction.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    }
# The data plane's own alias (core/db.py): the same database, used only from
# run_db's long-lived worker threads, each keeping one persistent connection. No
# pool between them and Postgres, so nothing to back off after Postgres restarts:
# a dead connection is replaced on the spot (run_db retries once).
DATABASES["hotpath"] = {
    **DATABASES["default"],
    "CONN_MAX_AGE": 600,
    "CONN_HEALTH_CHECKS": False,
    "OPTIONS": {
        k: v
        for k, v in cast(dict[str, Any], DATABASES["default"]["OPTIONS"]).items()
        if k != "pool"
    },
    "TEST": {"MIRROR": "default"},
}
DATABASE_ROUTERS = ["core.db.HotPathRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, cache and Celery -----------------------------------------------------
# REDIS_URL turns Redis on and is the default for the three roles below. Budgets
# (with rate limits, reservations and idempotency keys) and the Celery broker must
# never lose a key to eviction, so they belong on a Redis with `noeviction`; the
# response cache is disposable and belongs on one with an LRU policy. Pointing the
# roles at separate instances (or databases) keeps one policy from hurting another.
REDIS_URL = validate_redis_url(env_str("REDIS_URL")) if env_str("REDIS_URL") else ""
GATEWAY_BUDGET_REDIS_URL = redis_role_url("GATEWAY_BUDGET_REDIS_URL", REDIS_URL)
GATEWAY_CACHE_REDIS_URL = redis_role_url("GATEWAY_CACHE_REDIS_URL", REDIS_URL)
REDIS_TIMEOUT_SECONDS = env_float("GATEWAY_REDIS_TIMEOUT_SECONDS", 0.5, minimum=0.01)
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": GATEWAY_CACHE_REDIS_URL,
            "KEY_PREFIX": "gw",
            # Django's own cache holds nothing that must survive; a day bounds it anyway.
            "TIMEOUT": 86400,
            "OPTIONS": {
                "socket_timeout": REDIS_TIMEOUT_SECONDS,
                "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

CELERY_BROKER_URL = redis_role_url("CELERY_BROKER_URL", REDIS_URL) or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TIMEZONE = "UTC"
# Every task is interrupted (SoftTimeLimitExceeded) after the soft limit and its
# process killed a minute later; tasks that legitimately run longer (rollups,
# invoices, batches) and deliveries set their own (core/tasks.py time_limits).
CELERY_TASK_SOFT_TIME_LIMIT = env_int("GATEWAY_TASK_SOFT_TIME_LIMIT_SECONDS", 300, minimum=1)
CELERY_TASK_TIME_LIMIT = CELERY_TASK_SOFT_TIME_LIMIT + 60

# --- Auth, sessions, security ------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("GATEWAY_SECURE_COOKIES", not DEBUG and not TESTING)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# TLS is usually ended by a proxy in front; these apply to the dashboard and the
# management API (the data plane runs without SecurityMiddleware, see config/asgi.py).
# Trust the proxy's X-Forwarded-Proto only when one is there to set it: otherwise a
# client could claim https itself.
if env_bool("GATEWAY_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("GATEWAY_SSL_REDIRECT", False)
# Sent only on https responses, so it is safe to set before TLS works everywhere.
SECURE_HSTS_SECONDS = env_int("GATEWAY_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("GATEWAY_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("GATEWAY_HSTS_PRELOAD", False)
if SECURE_HSTS_PRELOAD and (SECURE_HSTS_SECONDS < 31536000 or not SECURE_HSTS_INCLUDE_SUBDOMAINS):
    raise ImproperlyConfigured(
        "GATEWAY_HSTS_PRELOAD=1 needs GATEWAY_HSTS_SECONDS of at least 31536000 (a year) "
        "and GATEWAY_HSTS_INCLUDE_SUBDOMAINS=1, as browsers' preload lists require."
    )

# Dashboard logins are throttled by django-axes: after GATEWAY_LOGIN_FAILURE_LIMIT
# failures for one username from one address, that pair is refused (429) for
# GATEWAY_LOGIN_COOLOFF_SECONDS; the same username from elsewhere is not locked out.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    # ModelBackend that refuses passwords of all but superusers under
    # GATEWAY_PASSWORD_LOGIN=false; SSO sessions use it too (it loads the user).
    "accounts.backends.PasswordLoginBackend",
]
AXES_FAILURE_LIMIT = env_int("GATEWAY_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(seconds=env_int("GATEWAY_LOGIN_COOLOFF_SECONDS", 900, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
LOGIN_URL = "/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# Bodies of the full-stack routes (dashboard forms, /login/, /api/admin): config/asgi.py
# refuses a bigger one with 413 while reading it, before routing or authentication.
# The default equals FILE_UPLOAD_MAX_MEMORY_SIZE, so such a body never spools to disk.
GATEWAY_SITE_MAX_BODY_BYTES = env_int("GATEWAY_SITE_MAX_BODY_BYTES", 2_621_440, minimum=1024)
# Django's own check, the same limit, for anything that reaches a full-stack view.
# Data-plane requests (config.asgi.DataPlaneRequest) have their own, larger limits.
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_SITE_MAX_BODY_BYTES

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("GATEWAY_LOG_LEVEL", "INFO").upper()},
    "loggers": {
        # litellm logs request details (including headers) at INFO/DEBUG, and warns
        # about every custom-priced model when a router is built.
        "LiteLLM": {"level": "ERROR"},
        "LiteLLM Router": {"level": "WARNING"},
        "LiteLLM Proxy": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}

# --- Gateway -----------------------------------------------------------------------------
# Bearer token for /api/admin; the management API is disabled while it is empty.
GATEWAY_ADMIN_TOKEN = env_str("GATEWAY_ADMIN_TOKEN")
# Fernet keys (comma-separated, newest first) that encrypt provider credentials at
# rest. Unset: one key derived from SECRET_KEY.
GATEWAY_ENCRYPTION_KEYS = env_list("GATEWAY_ENCRYPTION_KEY", [])
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 8 * 1024 * 1024, minimum=1024)
# How stale an in-process view of a key or of the model configuration may be. A
# revocation therefore reaches every process within this many seconds.
GATEWAY_KEY_CACHE_SECONDS = env_float("GATEWAY_KEY_CACHE_SECONDS", 1.0)
# Unknown key secrets are remembered this long (a key issued after a miss works
# within it) and at most this many at once, oldest dropped first: a flood of random
# keys then costs one query per distinct key per interval, and bounded memory.
GATEWAY_KEY_NEGATIVE_CACHE_SECONDS = env_float(
    "GATEWAY_KEY_NEGATIVE_CACHE_SECONDS", GATEWAY_KEY_CACHE_SECONDS
)
GATEWAY_KEY_NEGATIVE_CACHE_ENTRIES = env_int(
    "GATEWAY_KEY_NEGATIVE_CACHE_ENTRIES", 10_000, minimum=1
)
GATEWAY_CONFIG_POLL_SECONDS = env_float("GATEWAY_CONFIG_POLL_SECONDS", 1.0)
GATEWAY_UPSTREAM_TIMEOUT_SECONDS = env_float("GATEWAY_UPSTREAM_TIMEOUT_SECONDS", 300.0, minimum=1)
# A budget reservation is leased: the process that holds it renews it every third of
# this while its request runs, however long that is (a long stream, retries, waits).
# Only when the process is gone do renewals stop, and the reservation is released
# this long after the last one. Each renewal may take up to twice the Redis timeout,
# so a lease shorter than six of those could lapse under a merely slow Redis.
GATEWAY_RESERVATION_LEASE_SECONDS = env_float("GATEWAY_RESERVATION_LEASE_SECONDS", 30.0, minimum=1)
if GATEWAY_RESERVATION_LEASE_SECONDS < 6 * REDIS_TIMEOUT_SECONDS:
    raise ImproperlyConfigured(
        f"GATEWAY_RESERVATION_LEASE_SECONDS={GATEWAY_RESERVATION_LEASE_SECONDS} must be at least "
        f"6 x GATEWAY_REDIS_TIMEOUT_SECONDS ({6 * REDIS_TIMEOUT_SECONDS:g}), so that a renewal "
        "(every third of the lease) can stall on a slow Redis without the lease lapsing."
    )
# Exceptions to the api_base rule (gateway.destinations): host names, IP addresses or
# CIDR networks an admin may point a deployment at although they are link-local or a
# cloud metadata service. Empty by default.
GATEWAY_API_BASE_ALLOW = env_destinations("GATEWAY_API_BASE_ALLOW")
# Used to reserve budget when a request gives no max_tokens and the model's own
# maximum output is unknown.
GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS = env_int("GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS", 4096, minimum=1)
GATEWAY_KEY_PREFIX = "sk-gw-"
# Where ledger rows wait, fsync'd, while Postgres is unreachable (billing/spool.py).
GATEWAY_LEDGER_SPOOL_DIR = env_str("GATEWAY_LEDGER_SPOOL_DIR", str(VAR_DIR / "ledger-spool"))
# Response cache: default TTL when a request turns it on with `x-gateway-cache: on`,
# and whether a hit is billed like the original answer (default: hits are free).
GATEWAY_CACHE_TTL_SECONDS = env_int("GATEWAY_CACHE_TTL_SECONDS", 3600, minimum=1)
GATEWAY_CACHE_BILL_HITS = env_bool("GATEWAY_CACHE_BILL_HITS", False)
# What one team may keep in the response cache and in the idempotency store; storing
# past a cap evicts that team's oldest entries, and an entry bigger than the byte cap
# on its own is not stored (core/capped_store.py).
GATEWAY_CACHE_MAX_ENTRIES_PER_TEAM = env_int(
    "GATEWAY_CACHE_MAX_ENTRIES_PER_TEAM", 10_000, minimum=1
)
GATEWAY_CACHE_MAX_BYTES_PER_TEAM = env_int(
    "GATEWAY_CACHE_MAX_BYTES_PER_TEAM", 100 * 1024 * 1024, minimum=1024
)
GATEWAY_IDEMPOTENCY_MAX_ENTRIES_PER_TEAM = env_int(
    "GATEWAY_IDEMPOTENCY_MAX_ENTRIES_PER_TEAM", 100_000, minimum=1
)
GATEWAY_IDEMPOTENCY_MAX_BYTES_PER_TEAM = env_int(
    "GATEWAY_IDEMPOTENCY_MAX_BYTES_PER_TEAM", 256 * 1024 * 1024, minimum=1024
)

# --- Workers: rollups, invoices, alerts, webhooks, batches -------------------------------
# Outgoing mail for budget alerts (console by default: nothing leaves the machine).
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT_SECONDS", 10, minimum=1)
EMAIL_FILE_PATH = env_str("EMAIL_FILE_PATH", str(VAR_DIR / "mail"))
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "LLM Gateway <gateway@localhost>")

# Webhooks: deliveries to loopback/private addresses are refused (SSRF) unless allowed.
GATEWAY_WEBHOOK_ALLOW_PRIVATE = env_bool("GATEWAY_WEBHOOK_ALLOW_PRIVATE", False)
GATEWAY_WEBHOOK_TIMEOUT_SECONDS = env_float("GATEWAY_WEBHOOK_TIMEOUT_SECONDS", 10.0, minimum=0.1)
GATEWAY_WEBHOOK_MAX_ATTEMPTS = env_int("GATEWAY_WEBHOOK_MAX_ATTEMPTS", 8, minimum=1)
# How much of an endpoint's answer is read (an excerpt is kept); the rest is dropped.
GATEWAY_WEBHOOK_MAX_RESPONSE_BYTES = env_int(
    "GATEWAY_WEBHOOK_MAX_RESPONSE_BYTES", 64 * 1024, minimum=1024
)
# First retry delay; doubles per attempt (30 s, 1 min, 2 min, … ~1 h for the 8th).
GATEWAY_WEBHOOK_RETRY_BASE_SECONDS = env_float(
    "GATEWAY_WEBHOOK_RETRY_BASE_SECONDS", 30.0, minimum=0.01
)
GATEWAY_EMAIL_MAX_ATTEMPTS = env_int("GATEWAY_EMAIL_MAX_ATTEMPTS", 6, minimum=1)

# Rollups: ledger rows created within this many seconds before the last run are
# re-scanned, so a row whose transaction committed late is never missed.
GATEWAY_ROLLUP_OVERLAP_SECONDS = env_int("GATEWAY_ROLLUP_OVERLAP_SECONDS", 300, minimum=0)
GATEWAY_ROLLUP_INTERVAL_SECONDS = env_int("GATEWAY_ROLLUP_INTERVAL_SECONDS", 300, minimum=1)
GATEWAY_ALERT_SWEEP_SECONDS = env_int("GATEWAY_ALERT_SWEEP_SECONDS", 30, minimum=1)
# Closed months without an invoice are drafted this far back.
GATEWAY_INVOICE_BACKFILL_MONTHS = env_int("GATEWAY_INVOICE_BACKFILL_MONTHS", 12, minimum=1)
GATEWAY_INVOICE_PREFIX = env_str("GATEWAY_INVOICE_PREFIX", "INV")
# An invoice covers ledger rows created up to this long before it is computed; rows
# younger than that (a write may still be committing) go onto the next invoice.
GATEWAY_INVOICE_CUTOFF_LAG_SECONDS = env_int("GATEWAY_INVOICE_CUTOFF_LAG_SECONDS", 60, minimum=0)

# Reconciliation with the providers' bills: a provider/model/day whose provider cost and
# ledger list cost differ by more than this percentage raises a drift alert, once.
# Read as a Decimal: it is compared with exact money, never through a float.
_drift = env_str("GATEWAY_RECONCILIATION_DRIFT_PERCENT", "2")
try:
    GATEWAY_RECONCILIATION_DRIFT_PERCENT = Decimal(_drift)
except InvalidOperation:
    raise ImproperlyConfigured(
        f"GATEWAY_RECONCILIATION_DRIFT_PERCENT={_drift!r} is not a number; use e.g. 2 or 0.5."
    ) from None
if not GATEWAY_RECONCILIATION_DRIFT_PERCENT.is_finite() or not (
    0 <= GATEWAY_RECONCILIATION_DRIFT_PERCENT <= 1000
):
    raise ImproperlyConfigured(
        f"GATEWAY_RECONCILIATION_DRIFT_PERCENT={_drift!r} must be 0 to 1000."
    )

# Files and batches (OpenAI Batch API).
GATEWAY_FILES_DIR = Path(env_str("GATEWAY_FILES_DIR", str(VAR_DIR / "files")))
GATEWAY_FILES_STORAGE_BACKEND = env_str(
    "GATEWAY_FILES_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage"
)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "gateway_files": {
        "BACKEND": GATEWAY_FILES_STORAGE_BACKEND,
        "OPTIONS": (
            {"location": str(GATEWAY_FILES_DIR)}
            if GATEWAY_FILES_STORAGE_BACKEND.endswith("FileSystemStorage")
            else {}
        ),
    },
}
GATEWAY_FILE_MAX_BYTES = env_int("GATEWAY_FILE_MAX_BYTES", 100 * 1024 * 1024, minimum=1024)
GATEWAY_BATCH_MAX_LINES = env_int("GATEWAY_BATCH_MAX_LINES", 50_000, minimum=1)
# Batch lines that run live (their deployment's provider has no batch API, so the
# provider is paid its full live price) are charged this percentage less: an explicit
# subsidy, visible in the ledger as charged cost below list cost. Native batch lines are
# billed at the provider's batch prices and never get this discount.
if "GATEWAY_BATCH_DISCOUNT_PERCENT" in os.environ:
    # Renamed (and its default changed from 50 to 0): a forgotten old setting must not
    # silently stop applying.
    raise ImproperlyConfigured(
        "GATEWAY_BATCH_DISCOUNT_PERCENT is gone: live batch lines are charged full price by "
        "default; set GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT (0 to 100) for a subsidy."
    )
GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT = env_float("GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT", 0.0)
if not 0 <= GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT <= 100:
    raise ImproperlyConfigured(
        f"GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT={GATEWAY_EMULATED_BATCH_DISCOUNT_PERCENT} "
        "must be 0 to 100."
    )
# A batch whose lines all go to one deployment with a batch API (OpenAI, Azure OpenAI,
# Anthropic) is submitted to it natively; off, every batch runs live. A deployment opts
# out with capabilities {"native_batches": false}. On by default only with a broker:
# without one (`make run`) no beat polls the provider, and a native batch would never end.
GATEWAY_NATIVE_BATCHES = env_bool("GATEWAY_NATIVE_BATCHES", not CELERY_TASK_ALWAYS_EAGER)
# How often beat polls the provider batches in flight.
GATEWAY_NATIVE_BATCH_POLL_SECONDS = env_float("GATEWAY_NATIVE_BATCH_POLL_SECONDS", 60.0, minimum=1)
# Lines of one team's batches in flight at once, across every worker.
GATEWAY_BATCH_TEAM_CONCURRENCY = env_int("GATEWAY_BATCH_TEAM_CONCURRENCY", 16, minimum=1)
# A worker renews its claim on the lines it runs every third of this; a line whose
# claim lapsed (its worker died) is taken over by another worker.
GATEWAY_BATCH_LEASE_SECONDS = env_float("GATEWAY_BATCH_LEASE_SECONDS", 60.0, minimum=0.5)
# One task works on a batch for at most this long, then hands over to a fresh task
# (well under the broker's visibility timeout, so a slow batch is never redelivered).
GATEWAY_BATCH_SLICE_SECONDS = env_float("GATEWAY_BATCH_SLICE_SECONDS", 300.0, minimum=1)

# --- Identity: single sign-on (OIDC), SCIM provisioning, invitations --------------------
# OIDC is on when an issuer is set; its endpoints come from the issuer's discovery
# document (accounts/sso.py). The client must be registered at the IdP with the
# redirect URI <site>/sso/callback/.
GATEWAY_OIDC_ISSUER = env_str("GATEWAY_OIDC_ISSUER")
GATEWAY_OIDC_CLIENT_ID = env_str("GATEWAY_OIDC_CLIENT_ID")
GATEWAY_OIDC_CLIENT_SECRET = env_str("GATEWAY_OIDC_CLIENT_SECRET")
GATEWAY_OIDC_SCOPES = env_str("GATEWAY_OIDC_SCOPES", "openid email profile")
GATEWAY_OIDC_GROUPS_CLAIM = env_str("GATEWAY_OIDC_GROUPS_CLAIM", "groups")
# IdP groups whose members are platform admins, or finance, while they hold the group.
GATEWAY_OIDC_ADMIN_GROUPS = env_list("GATEWAY_OIDC_ADMIN_GROUPS", [])
GATEWAY_OIDC_FINANCE_GROUPS = env_list("GATEWAY_OIDC_FINANCE_GROUPS", [])
# False: only SSO signs people in, except superusers (the break-glass account).
GATEWAY_PASSWORD_LOGIN = env_bool("GATEWAY_PASSWORD_LOGIN", True)
if GATEWAY_OIDC_ISSUER:
    if not GATEWAY_OIDC_ISSUER.startswith(("https://", "http://")):
        raise ImproperlyConfigured(
            f"GATEWAY_OIDC_ISSUER={GATEWAY_OIDC_ISSUER!r} is not a URL: use the issuer as the "
            "IdP states it, e.g. https://login.example.com/realms/acme."
        )
    if not GATEWAY_OIDC_CLIENT_ID or not GATEWAY_OIDC_CLIENT_SECRET:
        raise ImproperlyConfigured(
            "GATEWAY_OIDC_ISSUER is set: GATEWAY_OIDC_CLIENT_ID and GATEWAY_OIDC_CLIENT_SECRET "
            "are required too (the client registered at the IdP)."
        )
    if "openid" not in GATEWAY_OIDC_SCOPES.split():
        raise ImproperlyConfigured(
            f"GATEWAY_OIDC_SCOPES={GATEWAY_OIDC_SCOPES!r} must include openid."
        )
elif not GATEWAY_PASSWORD_LOGIN:
    raise ImproperlyConfigured(
        "GATEWAY_PASSWORD_LOGIN=false leaves no way to sign in: set GATEWAY_OIDC_ISSUER "
        "(and its client) too."
    )
# Bearer token of the SCIM 2.0 endpoint (/scim/v2/); SCIM is off while it is empty.
GATEWAY_SCIM_TOKEN = env_str("GATEWAY_SCIM_TOKEN")
# How long an invitation link works.
GATEWAY_INVITATION_DAYS = env_int("GATEWAY_INVITATION_DAYS", 7, minimum=1)
