"""Fill the ledger with realistic generated traffic, to measure the dashboard against it.

    manage.py dashboard_generate_ledger --rows 1000000 [--days 365]

Teams and keys are created through the gateway's services (idempotently, by name);
the ledger rows are streamed in with COPY on Postgres, in time order, as a live
gateway would have written them: a year of history by default, with traffic growing
over it and a daily rhythm (about 9% of the rows then fall in the last 21 days).
Not for production data: every generated row's request id starts with "gen-".
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.utils import timezone

from accounts import services as account_services
from accounts.models import Team, VirtualKey
from billing.ledger import AttemptRecord, ledger_write
from billing.models import LedgerEntry
from billing.pricing import Usage


@dataclass(frozen=True)
class FakeModel:
    name: str
    provider: str
    input_per_million: Decimal
    output_per_million: Decimal
    share: float
    latency_ms: float  # median


MODELS = [
    FakeModel("gpt-4o-mini", "openai", Decimal("0.15"), Decimal("0.60"), 0.38, 650),
    FakeModel("gpt-4o", "openai", Decimal("2.50"), Decimal("10.00"), 0.17, 1400),
    FakeModel("claude-3-5-haiku", "anthropic", Decimal("0.80"), Decimal("4.00"), 0.16, 900),
    FakeModel("claude-sonnet-4", "anthropic", Decimal("3.00"), Decimal("15.00"), 0.12, 2100),
    FakeModel("llama-3.1-70b", "hosted_vllm", Decimal("0.60"), Decimal("0.80"), 0.09, 1100),
    FakeModel("text-embedding-3-small", "openai", Decimal("0.02"), Decimal("0"), 0.08, 120),
]
TAGS = ["prod", "staging", "batch-jobs", "support-bot", "search", "evals"]
COLUMNS = [
    "request_id",
    "attempt",
    "kind",
    "team_id",
    "key_id",
    "endpoint",
    "model",
    "deployment_id",
    "provider",
    "provider_model",
    "prompt_tokens",
    "completion_tokens",
    "cached_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "list_cost_micro_usd",
    "charged_cost_micro_usd",
    "status",
    "http_status",
    "error_type",
    "cache_hit",
    "is_batch",
    "stream",
    "latency_ms",
    "ttft_ms",
    "started_at",
    "ended_at",
    "end_user",
    "tags",
    "created_at",
]


class Command(BaseCommand):
    help = "Generate ledger rows (and the teams and keys they belong to) for load testing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rows", type=int, default=1_000_000)
        parser.add_argument(
            "--days", type=int, default=365, help="Spread the rows over this many days"
        )
        parser.add_argument("--teams", type=int, default=12)
        parser.add_argument("--keys-per-team", type=int, default=6)
        parser.add_argument("--seed", type=int, default=7)

    def handle(self, *args: Any, **options: Any) -> None:
        rows, days = options["rows"], options["days"]
        if rows < 1 or days < 1:
            raise CommandError("--rows and --days must be at least 1.")
        # Reproducible fake traffic, not secrets: a seeded PRNG is what we want.
        rng = random.Random(options["seed"])  # noqa: S311
        keys = self._teams_and_keys(options["teams"], options["keys_per_team"])
        started = time.monotonic()
        generated = _rows(rng, rows, days, keys)
        if connection.vendor == "postgresql":
            written = _copy(generated)
            with connection.cursor() as cursor:
                cursor.execute(f"ANALYZE {LedgerEntry._meta.db_table}")
        else:
            written = _bulk(generated)
        elapsed = time.monotonic() - started
        self.stdout.write(
            f"Wrote {written:,} ledger rows over {days} days for {len(keys)} keys "
            f"in {elapsed:.1f}s ({written / max(elapsed, 1e-9):,.0f} rows/s)."
        )

    def _teams_and_keys(self, teams: int, per_team: int) -> list[tuple[int, int, Decimal]]:
        """(team id, key id, markup) for every generated key, created when missing."""
        out = []
        for t in range(teams):
            name = f"Load team {t + 1:02d}"
            team = Team.objects.filter(name=name).first() or account_services.team_create(
                name=name,
                budget_micro_usd=(t % 4 + 1) * 2_500_000_000,  # $2,500 to $10,000 a month
                alert_thresholds=[50, 80, 100],
                markup_percent=Decimal(t % 3 * 5),
            )
            existing = list(VirtualKey.objects.filter(team=team).order_by("id")[:per_team])
            for k in range(len(existing), per_team):
                existing.append(account_services.key_create(team=team, name=f"service-{k + 1}").key)
            out += [(team.id, key.id, team.markup_percent) for key in existing]
        return out


def _rows(
    rng: random.Random, count: int, days: int, keys: list[tuple[int, int, Decimal]]
) -> Iterator[list[Any]]:
    now = timezone.now()
    start = now - timedelta(days=days)
    span = (now - start).total_seconds()
    run = uuid.uuid4().hex[:8]
    weights = [m.share for m in MODELS]
    # A few keys carry most of the traffic, as in life.
    key_weights = [1 / (i + 1) ** 0.8 for i in range(len(keys))]
    chosen_models = rng.choices(MODELS, weights=weights, k=count)
    chosen_keys = rng.choices(keys, weights=key_weights, k=count)
    for i in range(count):
        # In time order, with traffic growing over the period and a daily rhythm.
        position = (i + rng.random()) / count
        offset = span * math.sqrt(position) ** 1.2
        at = start + timedelta(seconds=min(offset, span - 1))
        hour = at.hour + at.minute / 60
        if rng.random() > 0.55 + 0.45 * math.sin(math.pi * max(0.0, min(1.0, (hour - 6) / 14))):
            at -= timedelta(hours=rng.uniform(0, 6))
        model = chosen_models[i]
        team_id, key_id, markup = chosen_keys[i]
        roll = rng.random()
        status, http_status, error_type = "success", 200, ""
        if roll < 0.012:
            status, http_status, error_type = "error", rng.choice([429, 500, 502, 503]), "upstream"
        elif roll < 0.016:
            status, http_status, error_type = "client_disconnected", 499, ""
        embedding = model.name.startswith("text-embedding")
        prompt = int(rng.lognormvariate(6.2, 0.9))
        completion = 0 if embedding or status == "error" else int(rng.lognormvariate(5.3, 0.8))
        cached = int(prompt * rng.choice([0, 0, 0, 0.3, 0.6]))
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_read_tokens=cached)
        exact = prompt * model.input_per_million + completion * model.output_per_million
        list_cost = (
            0 if status == "error" else int(exact.to_integral_value(rounding="ROUND_CEILING"))
        )
        charged = int(
            (Decimal(list_cost) * (100 + markup) / 100).to_integral_value(rounding="ROUND_CEILING")
        )
        latency = max(20, int(rng.lognormvariate(math.log(model.latency_ms), 0.45)))
        stream = not embedding and rng.random() < 0.4
        tags = [rng.choice(TAGS)] if rng.random() < 0.7 else []
        yield [
            f"gen-{run}-{i}",
            1,
            "charge",
            team_id,
            key_id,
            "embeddings" if embedding else "chat.completions",
            model.name,
            f"dep-{model.name}",
            model.provider,
            f"{model.provider}/{model.name}",
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_read_tokens,
            0,
            0,
            False,
            list_cost,
            charged,
            status,
            http_status,
            error_type,
            False,
            False,
            stream,
            latency,
            int(latency * rng.uniform(0.1, 0.4)) if stream else None,
            at,
            at + timedelta(milliseconds=latency),
            "",
            tags,
            at + timedelta(milliseconds=latency + 5),
        ]


def _copy(rows: Iterator[list[Any]], chunk: int = 50_000) -> int:
    """COPY in chunks of `chunk` rows, each one statement in a transaction of its own
    (well inside the statement timeout, and a failure loses one chunk at most)."""
    import json

    table = LedgerEntry._meta.db_table
    sql = f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN"
    tags_at = COLUMNS.index("tags")
    written = 0
    while True:
        batch = 0
        with (
            transaction.atomic(),
            connection.cursor() as cursor,
            cursor.cursor.copy(sql) as copy,
        ):
            for row in rows:
                row[tags_at] = json.dumps(row[tags_at])
                copy.write_row(row)
                batch += 1
                if batch >= chunk:
                    break
        written += batch
        if batch < chunk:
            return written


def _bulk(rows: Iterator[list[Any]], batch: int = 5000) -> int:
    """The portable path (SQLite): the ledger's own writer, in batches."""
    written = 0
    pending: list[AttemptRecord] = []
    for values in rows:
        row = dict(zip(COLUMNS, values, strict=True))
        pending.append(
            AttemptRecord(
                request_id=row["request_id"],
                attempt=1,
                team_id=row["team_id"],
                key_id=row["key_id"],
                endpoint=row["endpoint"],
                model=row["model"],
                status=row["status"],
                started_at=row["started_at"],
                ended_at=row["ended_at"],
                usage=Usage(
                    prompt_tokens=row["prompt_tokens"],
                    completion_tokens=row["completion_tokens"],
                    cached_read_tokens=row["cached_read_tokens"],
                ),
                list_cost_micro_usd=row["list_cost_micro_usd"],
                charged_cost_micro_usd=row["charged_cost_micro_usd"],
                deployment_id=row["deployment_id"],
                provider=row["provider"],
                provider_model=row["provider_model"],
                http_status=row["http_status"],
                error_type=row["error_type"],
                stream=row["stream"],
                latency_ms=row["latency_ms"],
                ttft_ms=row["ttft_ms"],
                tags=row["tags"],
            )
        )
        if len(pending) >= batch:
            ledger_write(pending)
            written += len(pending)
            pending = []
    if pending:
        ledger_write(pending)
        written += len(pending)
    return written
