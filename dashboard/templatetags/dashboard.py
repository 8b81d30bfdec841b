"""Template filters for the dashboard: money, counts, rates, durations and query strings."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django import template
from django.http import QueryDict
from django.utils.timesince import timesince

from dashboard import formatting

register = template.Library()


@register.filter
def usd(micro: int | float | Decimal | None) -> str:
    return formatting.usd(micro)


@register.filter
def usd_exact(micro: int | None) -> str:
    return formatting.usd_exact(micro)


@register.filter
def plain_number(value: Decimal | int | None) -> str:
    """12.500 → '12.5', 10.000 → '10': a stored rate as people write it."""
    if value is None:
        return "—"
    return format(Decimal(value).normalize(), "f")


@register.filter
def thousands(value: int | None) -> str:
    return "—" if value is None else f"{int(value):,}"


@register.filter
def compact(value: int | float | None) -> str:
    return formatting.compact(value)


@register.filter
def pct(fraction: float | None) -> str:
    return formatting.percent(fraction)


@register.filter
def ms(value: int | float | None) -> str:
    return formatting.duration_ms(value)


@register.filter
def ago(moment: datetime | None) -> str:
    """'5 minutes ago': the largest unit only."""
    if moment is None:
        return "never"
    return f"{timesince(moment, depth=1)} ago"


@register.filter
def bar_width(percent: float | None) -> str:
    """A progress bar's CSS width: clamped to 0 to 100%, dot decimal whatever the locale."""
    if percent is None:
        return "0%"
    return f"{max(0.0, min(100.0, percent)):.1f}%"


@register.filter
def jsonish(value: Any) -> str:
    """An audit value as people read it."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


@register.simple_tag(takes_context=True)
def query(context: dict[str, Any], **changes: Any) -> str:
    """The current query string with some parameters replaced (None or '' removes them)."""
    request = context["request"]
    params: QueryDict = request.GET.copy()
    for name, value in changes.items():
        if value is None or value == "":
            params.pop(name, None)
        else:
            params[name] = str(value)
    encoded = params.urlencode()
    return f"?{encoded}" if encoded else "?"


_OBJECT_LABELS = {
    "virtualkey": "key",
    "modeldeployment": "deployment",
    "modelgroup": "routing policy",
    "modelalias": "alias",
    "membership": "member",
    "webhookendpoint": "webhook endpoint",
    "teamnotificationsettings": "alert recipients",
}


@register.filter
def object_label(object_type: str) -> str:
    return _OBJECT_LABELS.get(object_type, object_type)


@register.simple_tag
def audit_value(field: str, value: Any) -> str:
    """An audit snapshot value; money fields (integer micro-USD) read as dollars."""
    if field.endswith("_micro_usd") and isinstance(value, int):
        return formatting.usd(value)
    text = jsonish(value)
    return text if len(text) <= 60 else text[:59] + "…"
