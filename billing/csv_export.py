"""CSV exports a spreadsheet cannot turn into formulas (OWASP's CSV-injection rule).

Every CSV the gateway serves (admin API ledger and invoices, dashboard usage and
invoices) is written through `safe_writer`. A text cell that starts with `=`, `+`,
`-`, `@`, a tab or a carriage return gets a leading `'`, so Excel, LibreOffice and
Google Sheets show it as text instead of evaluating it: a `user` or tag of
`=HYPERLINK(...)` comes out inert.

The rule is by type, not by content: every `str` is untrusted (tags, end users, key,
team and model names, descriptions), however numeric it looks. Only values that are
not strings pass unchanged: our own ints, and money as `Decimal` (`csv_amount`), so a
negative amount such as -1.500000 stays a number a spreadsheet can sum.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Protocol

from billing.pricing import micro_usd_to_str

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class _Writable(Protocol):
    def write(self, text: str, /) -> Any: ...


def csv_safe(value: object) -> object:
    """The cell to write for `value`: text that could start a formula is quoted with `'`."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_amount(micro_usd: int) -> Decimal:
    """Money for a CSV cell: six places, as in JSON, and a number (never prefixed)."""
    return Decimal(micro_usd_to_str(micro_usd))


class SafeWriter:
    """csv.writer whose rows are passed through `csv_safe`, cell by cell."""

    def __init__(self, out: _Writable) -> None:
        self._writer = csv.writer(out)

    def writerow(self, row: Iterable[object]) -> None:
        self._writer.writerow([csv_safe(cell) for cell in row])


def safe_writer(out: _Writable) -> SafeWriter:
    return SafeWriter(out)
