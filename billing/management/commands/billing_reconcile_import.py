"""Import a provider's cost or usage export, for the reconciliation with the ledger.

    manage.py billing_reconcile_import openai costs-2026-03.json --period 2026-03

The file is the provider's API result saved as JSON (billing.provider_exports says
which). All or nothing: a bad file is refused with the place of the problem, and
importing the same file again changes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.provider_exports import PROVIDERS, ExportError
from billing.reconciliation import provider_costs_import


class Command(BaseCommand):
    help = "Import a provider's cost/usage export (OpenAI costs or usage, Anthropic cost report)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("provider", choices=PROVIDERS)
        parser.add_argument("file", type=Path)
        parser.add_argument(
            "--period", default="", help="YYYY-MM: refuse a file with days outside this month"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        period: str = options["period"]
        if period and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", period):
            raise CommandError(f"--period {period!r}: use YYYY-MM, e.g. 2026-03.")
        path: Path = options["file"]
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc.strerror}.") from None
        try:
            outcome = provider_costs_import(
                provider=options["provider"], content=content, filename=path.name, period=period
            )
        except ExportError as exc:
            raise CommandError(f"{path.name}: {exc}. Nothing was imported.") from None
        span = f"{outcome.first_day} to {outcome.last_day}"
        if outcome.already_imported:
            self.stdout.write(f"{path.name} was already imported ({span}); nothing changed.")
            return
        self.stdout.write(
            f"Imported {outcome.provider} {outcome.kind} for {span}: {outcome.rows} model-days "
            f"({outcome.created} new, {outcome.updated} replaced), "
            f"{outcome.drift_alerts} new drift alert(s)."
        )
