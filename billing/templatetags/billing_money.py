"""Template filters for money: integer micro-USD shown as a six-place USD string."""

from __future__ import annotations

from django import template

from billing.pricing import micro_usd_to_str

register = template.Library()


@register.filter
def usd(micro: int | None) -> str:
    return micro_usd_to_str(int(micro or 0))
