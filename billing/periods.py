"""Budget periods, aligned to the calendar in a team's timezone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@dataclass(frozen=True, slots=True)
class Period:
    id: str  # stable name of the window, part of the counter's key
    start: datetime | None  # UTC; None for a one-off credit
    end: datetime | None  # UTC, exclusive; None for a one-off credit


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def current_period(kind: str, tz_name: str, now: datetime | None = None) -> Period:
    now = now or datetime.now(UTC)
    tz = zone(tz_name)
    local = now.astimezone(tz)
    # fold=0: where midnight happens twice (a DST change at 01:00), the day starts
    # at the first one, whichever pass through the repeated hour `now` is in.
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    if kind == "total":
        return Period("total", None, None)
    if kind == "daily":
        start = midnight
        end = _add_days(start, 1, tz)
        ident = start.strftime("d%Y%m%d")
    elif kind == "weekly":
        start = midnight - timedelta(days=midnight.weekday())
        start = start.replace(tzinfo=tz)
        end = _add_days(start, 7, tz)
        ident = start.strftime("w%Y%m%d")
    else:  # monthly
        start = midnight.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        ident = start.strftime("m%Y%m")
    return Period(ident, start.astimezone(UTC), end.astimezone(UTC))


def _add_days(start: datetime, days: int, tz: ZoneInfo) -> datetime:
    # Calendar days, not 24h blocks: across a DST change a day is 23 or 25 hours.
    naive = start.replace(tzinfo=None) + timedelta(days=days)
    return naive.replace(tzinfo=tz)
