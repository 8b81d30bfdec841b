"""Every environment value the gateway reads, parsed in one place.

A bad value stops start-up with a message that names the variable and says
what it should look like, instead of failing later on the first request.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean: use 1/0, true/false or yes/no.")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}.")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}.")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def env_destinations(name: str) -> tuple[str, ...]:
    """Comma-separated host names and IP addresses or CIDR networks, lower-cased."""
    entries = []
    for entry in env_list(name, []):
        value = entry.lower().rstrip(".")
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            if "/" in value or not all(_HOST_LABEL.match(p) for p in value.split(".")):
                raise ImproperlyConfigured(
                    f"{name}: {entry!r} is neither a host name nor an IP address or CIDR "
                    "network (e.g. metadata.internal,169.254.10.0/24)."
                ) from None
            if value[:1].isdigit() and value.replace(".", "").isdigit():
                message = f"{name}: {entry!r} is not a valid IP address."
                raise ImproperlyConfigured(message) from None
        entries.append(value)
    return tuple(entries)


@dataclass(frozen=True)
class DatabaseUrl:
    engine: str
    name: str
    user: str
    password: str
    host: str
    port: str
    options: dict[str, str]


def parse_database_url(raw: str) -> DatabaseUrl:
    """Parse `postgres://user:pass@host:port/db?sslmode=…`; only Postgres is accepted."""
    parts = urlsplit(raw)
    if parts.scheme not in {"postgres", "postgresql", "postgresql+psycopg"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL has scheme {parts.scheme!r}; "
            "use postgres://user:password@host:5432/dbname "
            "(leave DATABASE_URL unset to use the embedded SQLite file)."
        )
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ImproperlyConfigured("DATABASE_URL names no database: add /dbname after the host.")
    try:
        port = str(parts.port or 5432)
    except ValueError:
        raise ImproperlyConfigured("DATABASE_URL has a port that is not a number.") from None
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return DatabaseUrl(
        engine="django.db.backends.postgresql",
        name=name,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        host=parts.hostname or "127.0.0.1",
        port=port,
        options=options,
    )


def validate_redis_url(raw: str, name: str = "REDIS_URL") -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(
            f"{name} has scheme {parts.scheme!r}; use redis://host:6379/0 "
            "(leave REDIS_URL unset to use the in-process cache and eager Celery)."
        )
    return raw


def redis_role_url(name: str, redis_url: str) -> str:
    """The Redis URL of one role (budgets, cache, broker), defaulting to REDIS_URL.

    REDIS_URL is what turns Redis on; a role's own URL without it would leave the
    other roles in-process while this one is shared, so that is refused.
    """
    raw = env_str(name)
    if not raw:
        return redis_url
    if not redis_url:
        raise ImproperlyConfigured(
            f"{name} is set but REDIS_URL is not: set REDIS_URL too (it turns Redis on and "
            "is the default for GATEWAY_BUDGET_REDIS_URL, GATEWAY_CACHE_REDIS_URL and "
            "CELERY_BROKER_URL)."
        )
    return validate_redis_url(raw, name)
