"""Render the overview and usage pages N times and print how long they took.

    manage.py dashboard_time_pages --runs 20 [--as USERNAME] [--path /usage/?group_by=model]

Requests go through the whole Django stack (middleware, session, templates) with the
test client, in this process, against the configured database. By default it signs
in as a platform admin, who sees every team: the largest queries there are.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.test import Client

DEFAULT_PATHS = ["/overview/", "/usage/"]
TIMING_USER = "dashboard-timing"


class Command(BaseCommand):
    help = "Time the dashboard's overview and usage pages (p50 and max over N renders)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=20)
        parser.add_argument("--as", dest="username", default="", help="Sign in as this user")
        parser.add_argument("--path", action="append", default=[], help="Page to time (repeatable)")

    def handle(self, *args: Any, **options: Any) -> None:
        runs = options["runs"]
        if runs < 1:
            raise CommandError("--runs must be at least 1.")
        user = self._user(options["username"])
        host = next((h for h in settings.ALLOWED_HOSTS if h and not h.startswith(".")), "localhost")
        client = Client(SERVER_NAME=host.strip("[]"), raise_request_exception=True)
        client.force_login(user)
        role = "platform admin" if user.is_superuser else "user"
        self.stdout.write(f"As {user.username} ({role}), {runs} runs each:")
        for path in options["path"] or DEFAULT_PATHS:
            timings = []
            queries = QueryLog()
            started = time.perf_counter()
            with connection.execute_wrapper(queries):
                first = client.get(path)
            first_ms = (time.perf_counter() - started) * 1000
            if first.status_code != 200:
                raise CommandError(f"GET {path} answered {first.status_code}.")
            for _ in range(runs):
                started = time.perf_counter()
                response = client.get(path)
                timings.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200
            self.stdout.write(
                f"  GET {path:<28} p50 {statistics.median(timings):7.1f} ms   "
                f"max {max(timings):7.1f} ms   first {first_ms:7.1f} ms   "
                f"{len(queries.timings)} queries ({sum(queries.timings):.0f} ms in SQL)"
            )
            if options["verbosity"] > 1:
                for ms, sql in sorted(zip(queries.timings, queries.sql, strict=True))[-5:]:
                    self.stdout.write(f"      {ms:7.1f} ms  {sql[:160]}")

    def _user(self, username: str) -> User:
        if username:
            user = User.objects.filter(username=username).first()
            if user is None:
                raise CommandError(f"No user named {username!r}.")
            return user
        user = User.objects.filter(is_superuser=True, is_active=True).order_by("id").first()
        if user is None:
            user = User.objects.create_superuser(TIMING_USER, password=None)
        return user


class QueryLog:
    """A database execute wrapper that times every query of one request."""

    def __init__(self) -> None:
        self.timings: list[float] = []
        self.sql: list[str] = []

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.timings.append((time.perf_counter() - started) * 1000)
            self.sql.append(" ".join(sql.split()))
