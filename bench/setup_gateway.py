"""Gateway data for `make bench`, through the ORM and `gateway.services` (no management command).

    setup_gateway.py setup --mock-base http://127.0.0.1:PORT --run-id ID
        Points the deployments `bench-json` and `bench-stream` at the nginx mock
        (creating or updating them), creates a team and two keys with a large budget
        and rpm/tpm limits (so admission and rate limiting run on every request), and
        prints {"keys": {"load": {"secret", "id"}, "exact": {...}}, "team_id"} as JSON.
        The load generator (wrk) uses "load"; the sequential clients, which count every
        response exactly, use "exact". The secrets are for this throwaway database only.

    setup_gateway.py count --key-id N [--key-id M ...]
        Prints each key's ledger rows per status as JSON.

Run it with the project's interpreter from the repository root, with the same
environment as the server (DATABASE_URL, SECRET_KEY...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.db.models import Count  # noqa: E402

from accounts import services as account_services  # noqa: E402
from billing.models import LedgerEntry  # noqa: E402
from gateway import services  # noqa: E402
from gateway.models import ModelDeployment  # noqa: E402

DEPLOYMENTS = {"bench-json": "json", "bench-stream": "stream"}
# One dollar is 1,000,000 micro-USD; a bench request costs about 50 micro-USD.
BUDGET_MICRO_USD = 1_000_000 * 1_000_000
RPM_LIMIT = 1_000_000_000
TPM_LIMIT = 1_000_000_000_000


def setup(mock_base: str, run_id: str) -> dict[str, object]:
    for name, kind in DEPLOYMENTS.items():
        api_base = f"{mock_base.rstrip('/')}/{kind}/v1"
        existing = list(ModelDeployment.objects.filter(name=name).order_by("id"))
        if existing:
            # A reused database: repoint the first, drop the rest so routing is deterministic.
            services.deployment_update(
                deployment=existing[0], actor="bench", api_base=api_base, enabled=True
            )
            for extra in existing[1:]:
                services.deployment_delete(deployment=extra, actor="bench")
        else:
            services.deployment_create(
                name=name, provider_model="openai/gpt-4o-mini", actor="bench", api_base=api_base
            )
    team = account_services.team_create(name=f"bench-{run_id}", actor="bench")
    keys = {}
    for role in ("load", "exact"):
        issued = account_services.key_create(
            team=team,
            name=f"bench-{run_id}-{role}",
            actor="bench",
            max_budget_micro_usd=BUDGET_MICRO_USD,
            rpm_limit=RPM_LIMIT,
            tpm_limit=TPM_LIMIT,
        )
        keys[role] = {"secret": issued.secret, "id": issued.key.id}
    return {"keys": keys, "team_id": team.id}


def count(key_ids: list[int]) -> dict[str, dict[str, int]]:
    rows = (
        LedgerEntry.objects.filter(key_id__in=key_ids)
        .values("key_id", "status")
        .annotate(n=Count("id"))
        .order_by("key_id", "status")
    )
    found: dict[str, dict[str, int]] = {str(key_id): {} for key_id in key_ids}
    for row in rows:
        found[str(row["key_id"])][str(row["status"])] = int(row["n"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup")
    p_setup.add_argument("--mock-base", required=True)
    p_setup.add_argument("--run-id", required=True)
    p_count = sub.add_parser("count")
    p_count.add_argument("--key-id", type=int, action="append", required=True)
    args = parser.parse_args()
    if args.command == "setup":
        result: object = setup(args.mock_base, args.run_id)
    else:
        result = count(args.key_id)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
