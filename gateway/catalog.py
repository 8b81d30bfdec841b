"""What /v1/models shows: the models a key may use, with capabilities and prices."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from accounts.auth import KeyPrincipal
from gateway.routing import RoutingTable


def _price(value: Decimal) -> str:
    # USD per 1M tokens as a plain decimal string ("0.15", never "1.5E-7").
    return format(value.normalize(), "f")


def model_card(table: RoutingTable, name: str) -> dict[str, Any]:
    group = table.group(name)
    first = group[0]
    prices = table.max_prices(name)
    contexts = [d.context_length for d in group if d.context_length]
    outputs = [d.max_output_tokens for d in group if d.max_output_tokens]
    capabilities = {
        f"supports_{cap}": all(d.capabilities.get(cap, False) for d in group)
        for cap in ("function_calling", "vision", "streaming", "structured_output")
    }
    return {
        "id": name,
        "object": "model",
        "created": table.created.get(table.resolve(name), 0),
        "owned_by": first.provider,
        "context_length": min(contexts) if contexts else None,
        "max_output_tokens": min(outputs) if outputs else None,
        "capabilities": capabilities,
        "pricing": {
            "currency": "USD",
            "unit": "1M tokens",
            "input": _price(prices.input),
            "output": _price(prices.output),
            "cached_input": _price(prices.cached_input),
        },
    }


def models_for(table: RoutingTable, principal: KeyPrincipal) -> list[dict[str, Any]]:
    names = [name for name in table.public_names() if table.may_use(principal, name)]
    return [model_card(table, name) for name in names]
