"""Money in tests: cost maths, USD strings, ledger rows and the Redis budget counters."""

from __future__ import annotations

import random
import re
import time
import uuid
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

import redis

from tests.support.http import unique

ISO_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")


def cost_micro_usd(
    *,
    input_tokens: int,
    output_tokens: int,
    prices: tuple[Decimal | str, Decimal | str],
    reads: int = 0,
    writes: int = 0,
    cache_prices: tuple[Decimal | str, Decimal | str] = ("0", "0"),
) -> int:
    """Micro-USD for the usage at USD-per-1M prices, rounded UP; input excludes cache tokens.

    USD per 1M tokens is micro-USD per token, so the sum needs no scaling.
    """
    price_in, price_out = (Decimal(p) for p in prices)
    price_read, price_write = (Decimal(p) for p in cache_prices)
    exact = (
        input_tokens * price_in
        + reads * price_read
        + writes * price_write
        + output_tokens * price_out
    )
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def usd(value: str) -> int:
    """ "0.000450" → 450 micro-USD; refuses anything but a plain six-place decimal string."""
    assert re.fullmatch(r"-?\d+\.\d{6}", value), value
    return int(Decimal(value) * 1_000_000)


def usd_str(micro: int) -> str:
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


def iso_instants(text: str) -> list[datetime]:
    return [datetime.fromisoformat(m.replace("Z", "+00:00")) for m in ISO_INSTANT.findall(text)]


# --- models priced for exact budgets ------------------------------------------------------------


def output_priced_model(
    make_model: Any, *, output_tokens: int, output: str = "1", controls: str = "", **fields: Any
) -> Any:
    """A model whose prompt is free and whose every completion is `output_tokens` long.

    With free input, what admission reserves is exactly max_tokens * the output price, and
    a request costs exactly output_tokens * the output price: budgets can be tested to the
    micro-dollar without depending on how anyone counts prompt tokens. `controls` adds
    more of the mock's `;name=value` controls, e.g. ";status=400".
    """
    name = unique("m")
    fields.setdefault("input_cost_per_million", Decimal("0"))
    fields.setdefault("output_cost_per_million", Decimal(output))
    return make_model(
        name=name,
        provider_model=f"openai/{name};output_tokens={output_tokens}{controls}",
        **fields,
    )


def upstream_name(deployment: Any) -> str:
    """The model string the mock upstream counts calls under (provider prefix removed)."""
    return str(deployment.provider_model).split("/", 1)[1]


# --- the ledger ----------------------------------------------------------------------------------


def ledger(request_id: str) -> list[Any]:
    """The request's ledger rows in attempt order."""
    from billing.models import LedgerEntry

    return list(LedgerEntry.objects.filter(request_id=request_id).order_by("attempt"))


def ledger_for_model(model: str) -> list[Any]:
    """Every ledger row of a (test-unique) public model name, oldest first."""
    from billing.models import LedgerEntry

    return list(LedgerEntry.objects.filter(model=model).order_by("id"))


def ledger_for_key(key_id: int) -> list[Any]:
    """Every ledger row of a key, oldest first."""
    from billing.models import LedgerEntry

    return list(LedgerEntry.objects.filter(key_id=key_id).order_by("id"))


def ledger_cache_hits(**filters: Any) -> int:
    """How many ledger rows matching `filters` were served from the response cache."""
    from billing.models import LedgerEntry

    return LedgerEntry.objects.filter(cache_hit=True, **filters).count()


def ledger_spent(**filters: Any) -> int:
    """The charged micro-USD of the ledger rows matching `filters` (e.g. key_id=...)."""
    from django.db.models import Sum

    from billing.models import LedgerEntry

    total = LedgerEntry.objects.filter(**filters).aggregate(s=Sum("charged_cost_micro_usd"))["s"]
    return int(total or 0)


def ledger_row(
    *,
    team_id: int,
    started_at: datetime,
    key_id: int | None = 1,
    model: str = "m-a",
    provider: str = "openai",
    deployment_id: str = "dep-1",
    status: str = "success",
    tags: list[str] | None = None,
    charged: int | None = None,
    list_cost: int | None = None,
    usage: Any = None,
    **extra: Any,
) -> Any:
    """An AttemptRecord as the data plane builds it (random usage and cost unless given)."""
    from billing.ledger import AttemptRecord
    from billing.pricing import Usage

    usage = usage or Usage(
        prompt_tokens=random.randint(1, 5000), completion_tokens=random.randint(0, 900)
    )
    list_cost = random.randint(0, 50_000) if list_cost is None else list_cost
    return AttemptRecord(
        request_id=f"req_{uuid.uuid4().hex}",
        attempt=1,
        team_id=team_id,
        key_id=key_id,
        endpoint="chat.completions",
        model=model,
        status=status,
        started_at=started_at,
        ended_at=started_at + timedelta(seconds=1),
        usage=usage,
        list_cost_micro_usd=list_cost,
        charged_cost_micro_usd=list_cost * 11 // 10 if charged is None else charged,
        deployment_id=deployment_id,
        provider=provider,
        tags=tags or [],
        **extra,
    )


def write(records: list[Any], *, age: timedelta | None = None) -> list[Any]:
    """Insert rows as the data plane does; `age` backdates when they were recorded."""
    from django.utils import timezone

    from billing.ledger import ledger_write
    from billing.models import LedgerEntry

    ledger_write(records)
    if age is not None:
        LedgerEntry.objects.filter(request_id__in=[r.request_id for r in records]).update(
            created_at=timezone.now() - age
        )
    return records


# --- the Redis budget counters -----------------------------------------------------------------


def budget_counter(redis_url: str, key_id: int, *, required: bool = True) -> tuple[int, int]:
    """(spent, reserved) of the key's budget counter in Redis; (0, 0) if none and not required."""
    client = redis.Redis.from_url(redis_url)
    names = list(client.scan_iter(f"gw:bud:k:{key_id}:*"))
    if not names and not required:
        return 0, 0
    assert len(names) == 1, names
    state = client.hgetall(names[0])
    return int(state.get(b"spent", 0)), int(state.get(b"reserved", 0))


def wait_budget_settled(redis_url: str, key_id: int, timeout: float = 10) -> tuple[int, int]:
    """The key's (spent, reserved) once nothing is reserved and spent matches the ledger.

    Returns what it last read after `timeout` too: the caller asserts the exact values.
    """
    deadline = time.monotonic() + timeout
    while True:
        spent, reserved = budget_counter(redis_url, key_id)
        if (reserved == 0 and spent == ledger_spent(key_id=key_id)) or time.monotonic() > deadline:
            return spent, reserved
        time.sleep(0.05)
