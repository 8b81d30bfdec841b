"""Management API for money: spend per team and key, and the ledger (JSON or CSV)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

from django.http import HttpRequest, StreamingHttpResponse
from ninja import Query, Router, Schema

from billing import admission
from billing.admission import Budget
from billing.periods import current_period
from billing.pricing import micro_usd_to_str
from billing.selectors import LedgerFilter, ledger_rows, spend_by_model
from gateway.auth import AdminToken
from gateway.db import run_db
from gateway.errors import GatewayError
from gateway.models import Team, VirtualKey
from gateway.schemas import ErrorOut, Page, PageParams

router = Router(auth=AdminToken(), tags=["Billing"])


class ModelSpendOut(Schema):
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    list_cost_usd: str
    spent_usd: str


class SpendOut(Schema):
    scope: Literal["team", "key"]
    id: int
    period: str
    period_start: datetime | None
    period_end: datetime | None
    budget_usd: str | None
    spent_usd: str
    reserved_usd: str
    remaining_usd: str | None
    by_model: list[ModelSpendOut]


async def spend_report(
    *, scope: str, owner_id: int, limit: int | None, period_kind: str, tz: str
) -> SpendOut:
    period = current_period(period_kind, tz, datetime.now(UTC))
    models = await run_db(spend_by_model, scope=scope, owner_id=owner_id, period=period)
    spent = sum(int(row["charged_cost_micro_usd"] or 0) for row in models)
    reserved = 0
    if limit is not None:
        budget = Budget(scope, owner_id, limit, period_kind, period)
        snapshot = await admission.backend().snapshot(budget)
        reserved = snapshot[1] if snapshot else 0
    return SpendOut(
        scope=scope,  # type: ignore[arg-type]
        id=owner_id,
        period=period_kind,
        period_start=period.start,
        period_end=period.end,
        budget_usd=None if limit is None else micro_usd_to_str(limit),
        spent_usd=micro_usd_to_str(spent),
        reserved_usd=micro_usd_to_str(reserved),
        remaining_usd=None if limit is None else micro_usd_to_str(max(0, limit - spent - reserved)),
        by_model=[
            ModelSpendOut(
                model=row["model"],
                requests=row["requests"],
                prompt_tokens=row["prompt_tokens"] or 0,
                completion_tokens=row["completion_tokens"] or 0,
                cached_read_tokens=row["cached_read_tokens"] or 0,
                cache_write_tokens=row["cache_write_tokens"] or 0,
                reasoning_tokens=row["reasoning_tokens"] or 0,
                list_cost_usd=micro_usd_to_str(int(row["list_cost_micro_usd"] or 0)),
                spent_usd=micro_usd_to_str(int(row["charged_cost_micro_usd"] or 0)),
            )
            for row in models
        ],
    )


def _not_found(what: str, ident: int) -> GatewayError:
    return GatewayError(f"No {what} with id {ident}.", 404, code="not_found")


@router.get("/teams/{team_id}/spend", response={200: SpendOut, 401: ErrorOut, 404: ErrorOut})
async def team_spend(request: HttpRequest, team_id: int) -> SpendOut:
    team = await Team.objects.filter(id=team_id).afirst()
    if team is None:
        raise _not_found("team", team_id)
    return await spend_report(
        scope="team",
        owner_id=team.id,
        limit=team.budget_micro_usd,
        period_kind=team.budget_period,
        tz=team.timezone,
    )


@router.get("/keys/{key_id}/spend", response={200: SpendOut, 401: ErrorOut, 404: ErrorOut})
async def key_spend(request: HttpRequest, key_id: int) -> SpendOut:
    key = await VirtualKey.objects.select_related("team").filter(id=key_id).afirst()
    if key is None:
        raise _not_found("key", key_id)
    return await spend_report(
        scope="key",
        owner_id=key.id,
        limit=key.max_budget_micro_usd,
        period_kind=key.budget_period,
        tz=key.team.timezone,
    )


class LedgerQuery(Schema):
    team_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    status: Literal["success", "error", "client_disconnected", "partial"] | None = None
    since: datetime | None = None
    until: datetime | None = None
    format: Literal["json", "csv"] = "json"


class LedgerOut(Schema):
    request_id: str
    attempt: int
    kind: str
    team_id: int
    key_id: int | None
    endpoint: str
    model: str
    deployment_id: str
    provider: str
    provider_model: str
    status: str
    http_status: int | None
    prompt_tokens: int
    completion_tokens: int
    cached_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    usage_estimated: bool
    list_cost_usd: str
    charged_cost_usd: str
    cache_hit: bool
    stream: bool
    latency_ms: int
    ttft_ms: int | None
    started_at: datetime
    ended_at: datetime
    end_user: str
    tags: list[str]

    @staticmethod
    def of(row: Any) -> LedgerOut:
        return LedgerOut(
            **{name: getattr(row, name) for name in LEDGER_FIELDS},
            list_cost_usd=micro_usd_to_str(row.list_cost_micro_usd),
            charged_cost_usd=micro_usd_to_str(row.charged_cost_micro_usd),
        )


LEDGER_FIELDS = [
    name for name in LedgerOut.model_fields if name not in ("list_cost_usd", "charged_cost_usd")
]
CSV_COLUMNS = [*LEDGER_FIELDS, "list_cost_usd", "charged_cost_usd"]


def _csv(rows: Any) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in rows.iterator(chunk_size=2000):
        out = LedgerOut.of(row).model_dump()
        writer.writerow(
            [
                "|".join(out[c]) if c == "tags" else ("" if out[c] is None else out[c])
                for c in CSV_COLUMNS
            ]
        )
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


@router.get(
    "/ledger",
    response={200: Page[LedgerOut], 400: ErrorOut, 401: ErrorOut},
    summary="Ledger rows, newest first; format=csv exports every matching row",
)
def ledger(request: HttpRequest, query: Query[LedgerQuery], page: Query[PageParams]) -> Any:
    rows = ledger_rows(
        LedgerFilter(
            team_id=query.team_id,
            key_id=query.key_id,
            model=query.model,
            status=query.status,
            since=query.since,
            until=query.until,
        )
    )
    if query.format == "csv":
        response = StreamingHttpResponse(_csv(rows), content_type="text/csv")
        response["content-disposition"] = 'attachment; filename="ledger.csv"'
        return response
    return page.of(rows, LedgerOut.of)
