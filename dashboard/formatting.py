"""How numbers read on the pages: money, counts, rates and durations."""

from __future__ import annotations

from decimal import Decimal


def usd(micro: int | float | Decimal | None) -> str:
    """Integer micro-USD → '$1,234.57'; small amounts keep enough digits to be non-zero."""
    if micro is None:
        return "—"
    value = Decimal(micro) / 1_000_000
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value == 0:
        return "$0.00"
    if value < Decimal("0.01"):
        return f"{sign}${value:.4f}" if value >= Decimal("0.0001") else f"{sign}${value:.6f}"
    return f"{sign}${value:,.2f}"


def usd_exact(micro: int | None) -> str:
    """Integer micro-USD to the micro-dollar, as invoices state it: '$1,234.50', '$0.001234'."""
    if micro is None:
        return "—"
    sign = "-" if micro < 0 else ""
    dollars, fraction = divmod(abs(int(micro)), 1_000_000)
    digits = f"{fraction:06d}".rstrip("0")
    return f"{sign}${dollars:,}.{digits.ljust(2, '0')}"


def usd_axis(micro: float) -> str:
    value = micro / 1_000_000
    if value == 0:
        return "$0"
    if value >= 1000:
        return f"${value / 1000:,.1f}k".replace(".0k", "k")
    if value >= 1:
        return f"${value:,.0f}" if value == int(value) else f"${value:,.2f}"
    return f"${value:.2f}" if value >= 0.01 else f"${value:.4f}"


def compact(value: int | float | None) -> str:
    """1234 → '1.2k', 3_400_000 → '3.4M'."""
    if value is None:
        return "—"
    number = float(value)
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= limit:
            text = f"{number / limit:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{number:,.0f}" if number == int(number) else f"{number:,.1f}"


def percent(fraction: float | None, places: int = 1) -> str:
    if fraction is None:
        return "—"
    return f"{fraction * 100:.{places}f}%"


def duration_ms(value: int | float | None) -> str:
    if value is None:
        return "—"
    if value >= 10_000:
        return f"{value / 1000:.0f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.0f} ms"
