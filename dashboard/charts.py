"""Server-side SVG charts: no JavaScript, no CDN, readable without a charting library.

Each chart is an inline `<svg>` with a viewBox (so it scales to its card), gridlines
at "nice" values, and a `<title>` on every bar and point for hover tooltips.

The time axes come first: a `Window` (the dates a page covers, in a timezone) and the
`Axis` of buckets a chart draws over it, with how billing.usage's buckets fall in them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from billing.periods import current_period, zone

# --- time axes: windows and chart buckets ----------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A half-open UTC interval [since, until), shown in `tz`."""

    since: datetime
    until: datetime
    tz: ZoneInfo
    label: str

    @property
    def days(self) -> float:
        return (self.until - self.since).total_seconds() / 86400

    @property
    def first_day(self) -> date:
        return self.since.astimezone(self.tz).date()

    @property
    def last_day(self) -> date:
        return (self.until - timedelta(microseconds=1)).astimezone(self.tz).date()


def period_window(kind: str, tz_name: str, now: datetime | None = None) -> Window:
    """The current budget period of that kind; a never-resetting credit shows this month."""
    now = now or timezone.now()
    period = current_period("monthly" if kind == "total" else kind, tz_name, now)
    assert period.start is not None and period.end is not None
    label = {"daily": "Today", "weekly": "This week"}.get(kind, "This month")
    return Window(period.start, period.end, zone(tz_name), label)


def trailing_window(days: int, tz_name: str, now: datetime | None = None) -> Window:
    """The last `days` calendar days in `tz`, today included."""
    now = now or timezone.now()
    tz = zone(tz_name)
    today = now.astimezone(tz).date()
    return day_window(today - timedelta(days=days - 1), today, tz_name, f"Last {days} days")


def day_window(first: date, last: date, tz_name: str, label: str = "") -> Window:
    tz = zone(tz_name)
    since = datetime(first.year, first.month, first.day, tzinfo=tz).astimezone(UTC)
    after = last + timedelta(days=1)
    until = datetime(after.year, after.month, after.day, tzinfo=tz).astimezone(UTC)
    return Window(since, until, tz, label or f"{first:%d %b %Y} to {last:%d %b %Y}")


# Regrouping hourly rollups into local days reads 24 times the rows of the daily ones
# (which are UTC days): done for one team or key over a month at most; otherwise the
# charts show UTC days and say so.
LOCAL_DAYS_MAX_DAYS = 35


def _offsets(window: Window) -> set[timedelta]:
    """The window's UTC offsets at each local midnight."""
    out = set()
    day = window.first_day
    while day <= window.last_day:
        offset = datetime(day.year, day.month, day.day, tzinfo=window.tz).utcoffset()
        out.add(offset or timedelta(0))
        day += timedelta(days=1)
    return out


@dataclass(frozen=True)
class Axis:
    """The buckets of a chart, and how billing.usage's buckets fall into them.

    `source` is the bucket read from billing.usage (UTC hours or UTC days). Days and
    weeks are calendar days in `tz`: the window's timezone, or UTC when regrouping
    hours into local days would cost too much (`utc_days`).
    """

    kind: str  # hour | day | week
    source: str  # hour | day
    tz: ZoneInfo
    starts: list[datetime]
    utc_days: bool = False

    def _position(self, moment: datetime) -> Any:
        if self.kind == "hour":
            return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        day = moment.astimezone(self.tz).date()
        return day - timedelta(days=day.weekday()) if self.kind == "week" else day

    def index(self, moment: datetime) -> int | None:
        positions = self.__dict__.get("_positions")
        if positions is None:
            positions = {self._position(start): i for i, start in enumerate(self.starts)}
            object.__setattr__(self, "_positions", positions)
        return positions.get(self._position(moment))

    def label(self, start: datetime) -> str:
        if self.kind == "hour":
            return f"{start:%d %b %H:%M}" if start.minute else f"{start:%d %b %H:00}"
        return f"{start:%d %b}"


def axis_for(window: Window, kind: str, *, narrow: bool) -> Axis:
    if kind == "hour":
        # UTC hours (what the rollups hold), shown in the window's timezone.
        starts = []
        cursor = window.since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        while cursor < window.until:
            starts.append(cursor.astimezone(window.tz))
            cursor += timedelta(hours=1)
        return Axis("hour", "hour", window.tz, starts)
    offsets = _offsets(window)
    if offsets == {timedelta(0)}:  # UTC itself, or London in winter
        tz, source, utc_days = window.tz, "day", False
    elif (
        kind == "day"
        and narrow
        and window.days <= LOCAL_DAYS_MAX_DAYS
        # Local midnights on UTC hours (not India's or Nepal's): whole hours regroup.
        and all(offset % timedelta(hours=1) == timedelta(0) for offset in offsets)
    ):
        tz, source, utc_days = window.tz, "hour", False
    else:
        tz, source, utc_days = ZoneInfo("UTC"), "day", True
    first = window.since.astimezone(tz).date()
    last = (window.until - timedelta(microseconds=1)).astimezone(tz).date()
    if kind == "week":
        first -= timedelta(days=first.weekday())
    step = 7 if kind == "week" else 1
    starts = [
        datetime(d.year, d.month, d.day, tzinfo=tz)
        for d in (first + timedelta(days=i) for i in range(0, (last - first).days + 1, step))
    ]
    return Axis(kind, source, tz, starts, utc_days)


def bucket_for(window: Window) -> str:
    if window.days <= 2:
        return "hour"
    return "day" if window.days <= 92 else "week"


# --- drawing ------------------------------------------------------------------------------------

PALETTE = ["#6366f1", "#06b6d4", "#10b981", "#f59e0b", "#f43f5e", "#84cc16", "#a855f7", "#ec4899"]
OTHER_COLOR = "#cbd5e1"
DEFAULT_WIDTH = 640
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 14, 30


@dataclass(frozen=True)
class LegendItem:
    name: str
    color: str
    total: str = ""


@dataclass
class Chart:
    svg: SafeString
    legend: list[LegendItem] = field(default_factory=list)
    empty: bool = False


def nice_scale(maximum: float) -> tuple[float, float]:
    """(top, step): the lowest round axis top at or above `maximum`, with 4 to 6 ticks."""
    if maximum <= 0 or not math.isfinite(maximum):
        return 1.0, 0.25
    best: tuple[float, float] | None = None
    for ticks in (4, 5, 6):
        raw = maximum / ticks
        magnitude = 10 ** math.floor(math.log10(raw))
        for multiple in (1, 2, 2.5, 5, 10):
            step = multiple * magnitude
            if step * ticks >= maximum:
                if best is None or step * ticks < best[0]:
                    best = (step * ticks, step)
                break
    assert best is not None
    return best


def top_series(series: dict[str, list[float]], limit: int) -> list[tuple[str, list[float], str]]:
    """The `limit` largest series by total, the rest summed into 'Other'."""
    ranked = sorted(series.items(), key=lambda item: (-sum(item[1]), item[0]))
    out = [
        (name, values, PALETTE[i % len(PALETTE)]) for i, (name, values) in enumerate(ranked[:limit])
    ]
    rest = ranked[limit:]
    if rest:
        length = len(rest[0][1])
        summed = [sum(values[i] for _, values in rest) for i in range(length)]
        out.append((f"Other ({len(rest)})", summed, OTHER_COLOR))
    return out


def _frame(
    width: int, height: int, top: float, step: float, fmt: Callable[[float], str]
) -> list[str]:
    plot_h = height - TOP - BOTTOM
    parts = []
    value = 0.0
    while value <= top + step / 2:
        y = TOP + plot_h - plot_h * value / top
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(value))}</text>"
        )
        value += step
    return parts


def _x_labels(labels: Sequence[str], slot: float, height: int) -> list[str]:
    every = max(1, math.ceil(len(labels) / 10))
    parts = []
    for i, label in enumerate(labels):
        if i % every:
            continue
        x = LEFT + slot * (i + 0.5)
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{height - 8}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    return parts


def _svg(width: int, height: int, title: str, body: list[str]) -> SafeString:
    return mark_safe(  # noqa: S308 - every interpolated string above is escaped
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def _empty(width: int, height: int, title: str) -> Chart:
    body = [
        f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
        "No usage in this range yet</text>"
    ]
    return Chart(_svg(width, height, title, body), [], True)


def stacked_bars(
    labels: Sequence[str],
    series: dict[str, list[float]],
    *,
    fmt: Callable[[float], str],
    title: str,
    width: int = DEFAULT_WIDTH,
    height: int = 260,
    limit: int = 6,
) -> Chart:
    stacks = top_series(series, limit)
    totals = [sum(values[i] for _, values, _ in stacks) for i in range(len(labels))]
    if not labels or not any(totals):
        return _empty(width, height, title)
    top, step = nice_scale(max(totals))
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    slot = plot_w / len(labels)
    bar = max(1.0, min(slot * 0.68, 42))
    body = _frame(width, height, top, step, fmt)
    for i, label in enumerate(labels):
        x = LEFT + slot * i + (slot - bar) / 2
        base = float(TOP + plot_h)
        for name, values, color in stacks:
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            body.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{escape(label)} · {escape(name)}: '
                f"{escape(fmt(value))}</title></rect>"
            )
    body += _x_labels(labels, slot, height)
    legend = [LegendItem(name, color, fmt(sum(values))) for name, values, color in stacks]
    return Chart(_svg(width, height, title, body), legend)


def line_chart(
    labels: Sequence[str],
    series: dict[str, list[float | None]],
    *,
    fmt: Callable[[float], str],
    title: str,
    width: int = DEFAULT_WIDTH,
    height: int = 220,
    limit: int = 6,
) -> Chart:
    ranked = list(series.items())[:limit]
    values = [v for _, points in ranked for v in points if v is not None]
    if not labels or not values:
        return _empty(width, height, title)
    top, step = nice_scale(max(values))
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    slot = plot_w / len(labels)
    body = _frame(width, height, top, step, fmt)
    legend = []
    for n, (name, points) in enumerate(ranked):
        color = PALETTE[n % len(PALETTE)]
        coords = [
            (LEFT + slot * (i + 0.5), TOP + plot_h - plot_h * v / top, i, v)
            for i, v in enumerate(points)
            if v is not None
        ]
        if not coords:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in coords)
        if n == 0 and len(ranked) == 1:
            first_x, last_x = coords[0][0], coords[-1][0]
            area = f"{first_x:.1f},{TOP + plot_h} {path} {last_x:.1f},{TOP + plot_h}"
            body.append(f'<polygon points="{area}" fill="{color}" opacity="0.12"/>')
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.2" '
            'stroke-linejoin="round" stroke-linecap="round"/>'
        )
        if len(coords) <= 62:
            for x, y, i, v in coords:
                body.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#fff" stroke="{color}" '
                    f'stroke-width="2"><title>{escape(labels[i])} · {escape(name)}: '
                    f"{escape(fmt(v))}</title></circle>"
                )
        legend.append(LegendItem(name, color))
    body += _x_labels(labels, slot, height)
    return Chart(_svg(width, height, title, body), legend)


def sparkline(values: Sequence[float], *, color: str = PALETTE[0], title: str = "") -> SafeString:
    """A tiny trend line for a KPI card; the last point is marked."""
    width, height, pad = 120, 32, 3
    if len(values) < 2 or not any(values):
        return mark_safe("")
    top = max(values) or 1
    step = (width - 2 * pad) / (len(values) - 1)
    points = [
        (pad + i * step, height - pad - (height - 2 * pad) * v / top) for i, v in enumerate(values)
    ]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    area = f"{pad},{height - pad} {path} {points[-1][0]:.1f},{height - pad}"
    last_x, last_y = points[-1]
    return mark_safe(  # noqa: S308 - numbers and an escaped title only
        f'<svg class="spark" viewBox="0 0 {width} {height}" aria-hidden="true">'
        f"<title>{escape(title)}</title>"
        f'<polygon points="{area}" fill="{color}" opacity="0.12"/>'
        f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8" '
        'stroke-linejoin="round" stroke-linecap="round"/>'
        f'<circle cx="{last_x:.1f}" cy="{last_y:.1f}" r="2.4" fill="{color}"/></svg>'
    )
