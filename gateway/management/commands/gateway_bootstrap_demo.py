"""Create the demo set-up for `make run`, idempotently.

Models served by the project's own mock upstream, a demo team, a demo key whose
secret is printed only when it is first created (only its hash is stored), and, while
no superuser exists, a platform admin whose random password is printed the same way.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts import services as account_services
from accounts.models import Team, VirtualKey
from gateway import services
from gateway.models import ModelDeployment

DEMO_TEAM = "Demo team"
DEMO_KEY = "demo key"

# Public name → (provider model at the mock, explicit prices or None for litellm's map).
DEMO_MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("gpt-4o-mini", "openai/gpt-4o-mini", {}),
    ("text-embedding-3-small", "openai/text-embedding-3-small", {}),
    (
        "mock-fast",
        "openai/mock-fast",
        {
            "input_cost_per_million": Decimal("0.10"),
            "output_cost_per_million": Decimal("0.40"),
            "cached_input_cost_per_million": Decimal("0.025"),
            "context_length": 32000,
            "max_output_tokens": 4096,
        },
    ),
]


class Command(BaseCommand):
    help = "Create the demo models, team and key (idempotent; the key is printed once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--mock-url", default="http://127.0.0.1:9100", help="Mock upstream base URL"
        )
        parser.add_argument(
            "--gateway-url", default="http://127.0.0.1:8000", help="Printed in the example"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        api_base = options["mock_url"].rstrip("/") + "/v1"
        for name, provider_model, extra in DEMO_MODELS:
            existing = ModelDeployment.objects.filter(name=name).first()
            if existing is None:
                services.deployment_create(
                    name=name, provider_model=provider_model, api_base=api_base, **extra
                )
            elif existing.api_base != api_base:
                services.deployment_update(deployment=existing, api_base=api_base)

        team = Team.objects.filter(name=DEMO_TEAM).first() or account_services.team_create(
            name=DEMO_TEAM, budget_micro_usd=10_000_000, alert_thresholds=[50, 80, 100]
        )
        gateway_url = options["gateway_url"].rstrip("/")
        # A newcomer can open the dashboard at once: the first run makes a platform admin.
        admin = account_services.demo_admin_create()
        if admin is not None:
            self.stdout.write(
                f"""
Dashboard: {gateway_url}/login/ as a platform admin (shown only this once):

    username: {admin.username}
    password: {admin.password}
"""
            )
        if VirtualKey.objects.filter(team=team, name=DEMO_KEY, revoked_at__isnull=True).exists():
            self.stdout.write(
                "Demo set-up already exists; its key was printed when it was first created.\n"
                "Issue another with the management API (POST /api/admin/keys)."
            )
            return
        issued = account_services.key_create(
            team=team, name=DEMO_KEY, rpm_limit=600, tpm_limit=2_000_000
        )
        self.stdout.write(
            f"""
Demo team '{team.name}' with a $10.00 monthly budget, and a demo key (shown only this once):

    {issued.secret}

Try it:

    from openai import OpenAI
    client = OpenAI(base_url="{gateway_url}/v1", api_key="{issued.secret}")
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello!"}}]
    )
    print(reply.choices[0].message.content)

Models: {", ".join(name for name, _, _ in DEMO_MODELS)} (served by the mock upstream).
"""
        )
