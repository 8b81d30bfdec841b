"""Reading the providers' own cost and usage exports into provider/model/day figures.

Pure functions: bytes in, exact figures out, nothing written. The layouts are the
providers' documented API results, saved as JSON (one page, or a list of pages when
the export was paged):

- OpenAI, Costs API (`GET /v1/organization/costs`, `group_by=line_item`): daily
  buckets (`start_time`, `end_time` in Unix seconds) of results with `amount.value`
  in USD and a `line_item` such as "gpt-4o-mini-2024-07-18, input". The model is the
  line item's text before its first comma; a line item without one ("Image models")
  is kept under its whole name.
- OpenAI, Usage API (`GET /v1/organization/usage/completions`, `group_by=model`):
  daily buckets of results with `model`, `input_tokens`, `output_tokens`.
- Anthropic, Admin API cost report (`GET /v1/organizations/cost_report`,
  `group_by[]=description`): daily buckets (`starting_at`, `ending_at`, RFC 3339) of
  results with `amount` in cents as a decimal string ("123.45" is $1.2345), `model`,
  `cost_type`, `token_type`. Costs that are not tokens have no model and are kept
  under their `cost_type` ("web_search").

Amounts are read as Decimal from the JSON text itself (never through a float), and
every error names the place in the file, as a JSON path, and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

PROVIDERS = ("openai", "anthropic")
Kind = Literal["costs", "usage"]
CENTS = Decimal(100)
ONE_DAY = timedelta(days=1)


class ExportError(ValueError):
    """The file is not an export we can read; `place` says where (a JSON path)."""

    def __init__(self, place: str, message: str) -> None:
        super().__init__(f"{place}: {message}" if place else message)
        self.place = place


@dataclass
class DayFigures:
    cost_usd: Decimal | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass
class ParsedExport:
    provider: str
    kind: Kind
    # (model, UTC day) -> the provider's figures for that model and day, summed.
    figures: dict[tuple[str, date], DayFigures] = field(default_factory=dict)

    @property
    def days(self) -> list[date]:
        return sorted({day for _, day in self.figures})


def parse_export(provider: str, content: bytes, *, period: str = "") -> ParsedExport:
    """Read one export file; raises ExportError naming the place of the first problem."""
    if provider not in PROVIDERS:
        raise ExportError("", f"Unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}.")
    try:
        # parse_float=Decimal: "0.06" stays 0.06 exactly, never 0.059999….
        document = json.loads(content, parse_float=Decimal)
    except UnicodeDecodeError as exc:
        raise ExportError(
            "", f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"line {exc.lineno} column {exc.colno}", f"not JSON: {exc.msg}") from None
    pages = document if isinstance(document, list) else [document]
    parsed: ParsedExport | None = None
    for page_index, page in enumerate(pages):
        prefix = f"[{page_index}]." if isinstance(document, list) else ""
        data = _get(page, "data", prefix.rstrip(".") or "$")
        if not isinstance(data, list):
            raise ExportError(f"{prefix}data", "expected a list of daily buckets")
        for b_index, bucket in enumerate(data):
            place = f"{prefix}data[{b_index}]"
            day = _bucket_day(provider, bucket, place)
            if period and f"{day:%Y-%m}" != period:
                raise ExportError(place, f"the bucket of {day} is outside the period {period}")
            results = _get(bucket, "results", place)
            if not isinstance(results, list):
                raise ExportError(f"{place}.results", "expected a list")
            for r_index, result in enumerate(results):
                r_place = f"{place}.results[{r_index}]"
                kind, model, figures = _result(provider, result, r_place)
                if parsed is None:
                    parsed = ParsedExport(provider, kind)
                elif parsed.kind != kind:
                    raise ExportError(
                        r_place, f"a {kind} result in a {parsed.kind} export; import them apart"
                    )
                _add(parsed.figures.setdefault((model, day), DayFigures()), figures)
    if parsed is None:
        raise ExportError("data", "the export holds no results")
    return parsed


def _add(total: DayFigures, more: DayFigures) -> None:
    if more.cost_usd is not None:
        total.cost_usd = (total.cost_usd or Decimal(0)) + more.cost_usd
    if more.input_tokens is not None:
        total.input_tokens = (total.input_tokens or 0) + more.input_tokens
    if more.output_tokens is not None:
        total.output_tokens = (total.output_tokens or 0) + more.output_tokens


def _get(obj: Any, key: str, place: str) -> Any:
    if not isinstance(obj, dict):
        raise ExportError(place, "expected an object")
    if key not in obj:
        raise ExportError(f"{place}.{key}" if place != "$" else key, "missing")
    return obj[key]


def _bucket_day(provider: str, bucket: Any, place: str) -> date:
    """The UTC day of a daily bucket; a bucket that is not exactly one UTC day is refused."""
    if provider == "openai":
        start = _unix(_get(bucket, "start_time", place), f"{place}.start_time")
        end = _unix(_get(bucket, "end_time", place), f"{place}.end_time")
    else:
        start = _rfc3339(_get(bucket, "starting_at", place), f"{place}.starting_at")
        end = _rfc3339(_get(bucket, "ending_at", place), f"{place}.ending_at")
    if start.hour or start.minute or start.second or end - start != ONE_DAY:
        raise ExportError(place, "expected a daily bucket (bucket_width=1d) from 00:00 UTC")
    return start.date()


def _unix(value: Any, place: str) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ExportError(place, f"expected Unix seconds, got {value!r}")
    return datetime.fromtimestamp(value, UTC)


def _rfc3339(value: Any, place: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(place, f"expected an RFC 3339 time, got {value!r}") from None
    if moment.tzinfo is None:
        raise ExportError(place, f"expected a time with its UTC offset, got {value!r}")
    return moment.astimezone(UTC)


def _decimal(value: Any, place: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ExportError(place, f"expected a number, got {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ExportError(place, f"expected a decimal number, got {value!r}") from None
    if not number.is_finite():
        raise ExportError(place, f"expected a finite number, got {value!r}")
    return number


def _tokens(value: Any, place: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ExportError(place, f"expected a whole number of tokens, got {value!r}")
    return value


def _currency(value: Any, place: str) -> None:
    if str(value).lower() != "usd":
        raise ExportError(place, f"only USD is reconciled, got {value!r}")


def _result(provider: str, result: Any, place: str) -> tuple[Kind, str, DayFigures]:
    if provider == "openai":
        return _openai_result(result, place)
    return _anthropic_result(result, place)


def _openai_result(result: Any, place: str) -> tuple[Kind, str, DayFigures]:
    obj = _get(result, "object", place)
    if obj == "organization.costs.result":
        amount = _get(result, "amount", place)
        _currency(_get(amount, "currency", f"{place}.amount"), f"{place}.amount.currency")
        value = _decimal(_get(amount, "value", f"{place}.amount"), f"{place}.amount.value")
        line_item = _get(result, "line_item", place)
        if not isinstance(line_item, str) or not line_item.strip():
            raise ExportError(
                f"{place}.line_item", "expected a line item: export with group_by=line_item"
            )
        model = line_item.split(",", 1)[0].strip()
        return "costs", model, DayFigures(cost_usd=value)
    if obj == "organization.usage.completions.result":
        model = _get(result, "model", place)
        if not isinstance(model, str) or not model:
            raise ExportError(f"{place}.model", "expected a model: export with group_by=model")
        return (
            "usage",
            model,
            DayFigures(
                input_tokens=_tokens(_get(result, "input_tokens", place), f"{place}.input_tokens"),
                output_tokens=_tokens(
                    _get(result, "output_tokens", place), f"{place}.output_tokens"
                ),
            ),
        )
    raise ExportError(
        f"{place}.object",
        f"expected organization.costs.result or organization.usage.completions.result, got {obj!r}",
    )


def _anthropic_result(result: Any, place: str) -> tuple[Kind, str, DayFigures]:
    _currency(_get(result, "currency", place), f"{place}.currency")
    cents = _get(result, "amount", place)
    if not isinstance(cents, str):
        # The documented form is a decimal string; a JSON number is a different file.
        raise ExportError(f"{place}.amount", f"expected cents as a decimal string, got {cents!r}")
    usd = _decimal(cents, f"{place}.amount") / CENTS
    model = result.get("model") if isinstance(result, dict) else None
    if not model:
        cost_type = result.get("cost_type")
        if not cost_type:
            raise ExportError(
                f"{place}.model", "expected a model: export with group_by[]=description"
            )
        model = str(cost_type)
    return "costs", str(model), DayFigures(cost_usd=usd)


def iter_rows(parsed: ParsedExport) -> Iterator[tuple[str, date, DayFigures]]:
    for (model, day), figures in sorted(
        parsed.figures.items(), key=lambda kv: (kv[0][1], kv[0][0])
    ):
        yield model, day, figures
