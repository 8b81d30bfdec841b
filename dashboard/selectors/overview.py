"""The overview page: totals, spend per day and model, top models and keys, latency."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from typing import Any

from accounts.models import VirtualKey
from dashboard.charts import Axis, axis_for
from dashboard.selectors.usage import (
    Latency,
    Totals,
    UsageScope,
    latency_sample,
    plan_for,
    report,
    visible_usage,
)


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int
    tokens: int
    spend_micro_usd: int


@dataclass(frozen=True)
class KeyUsage:
    key_id: int | None
    name: str
    team_name: str
    requests: int
    spend_micro_usd: int


@dataclass
class Overview:
    totals: Totals
    latency: Latency
    axis: Axis
    days: list[date]
    # model → spend per day, aligned with `days`
    spend_by_model: dict[str, list[int]]
    requests_by_day: list[int]
    errors_by_day: list[int]
    top_models: list[ModelUsage]
    top_keys: list[KeyUsage]
    # Spend per team in this window (within the viewer's scope).
    spend_by_team: dict[int, int]

    @property
    def p50_ms(self) -> int | None:
        return self.latency.p50_ms

    @property
    def p95_ms(self) -> int | None:
        return self.latency.p95_ms


def usage_overview(scope: UsageScope, *, top: int = 5) -> Overview:
    """Totals, spend per day and model, top models and keys (billing.usage), and latency."""
    visible = visible_usage(scope.viewer)
    plan = plan_for(scope, visible)
    axis = axis_for(scope.window, "day", narrow=plan.narrow)
    days = [start.date() for start in axis.starts]
    totals = Totals()
    spend_by_model: dict[str, list[int]] = {}
    requests_by_day = [0] * len(days)
    errors_by_day = [0] * len(days)
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    # Two calls, each with few groups: grouping by day, key and model at once makes
    # tens of thousands of groups on a busy gateway, and Python's share of reading
    # them costs more than the second read of the ledger's live tail.
    by_day_model = report(scope, plan, dims=("model",), bucket=axis.source)
    by_key = report(scope, plan, dims=("team_id", "key_id"), bucket=None)
    for row in by_day_model:
        totals.add(row)
        spend = row["charged_cost_micro_usd"]
        i = axis.index(row["bucket_start"])
        if i is not None:
            series = spend_by_model.setdefault(row["model"], [0] * len(days))
            series[i] += spend
            requests_by_day[i] += row["requests"]
            errors_by_day[i] += row["errors"]
        agg = per_model[row["model"]]
        agg[0] += row["requests"]
        agg[1] += row["prompt_tokens"] + row["completion_tokens"]
        agg[2] += spend
    per_key: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    spend_by_team: dict[int, int] = defaultdict(int)
    for row in by_key:
        agg = per_key[(row["team_id"], row["key_id"])]
        agg[0] += row["charged_cost_micro_usd"]
        agg[1] += row["requests"]
        spend_by_team[row["team_id"]] += row["charged_cost_micro_usd"]
    top_models = sorted(
        (ModelUsage(model, *values) for model, values in per_model.items()),
        key=lambda m: (-m.spend_micro_usd, -m.requests, m.model),
    )[:top]
    top_keys = sorted(per_key.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))[:top]
    return Overview(
        totals=totals,
        latency=latency_sample(scope, visible),
        axis=axis,
        days=days,
        spend_by_model=spend_by_model,
        requests_by_day=requests_by_day,
        errors_by_day=errors_by_day,
        top_models=top_models,
        top_keys=_key_usage(
            [
                {"key_id": key_id or None, "spend": spend, "requests": requests}
                for (_team, key_id), (spend, requests) in top_keys
            ]
        ),
        spend_by_team=dict(spend_by_team),
    )


def _key_usage(grouped: list[dict[str, Any]]) -> list[KeyUsage]:
    ids = [r["key_id"] for r in grouped if r["key_id"] is not None]
    names = (
        {
            key.id: key
            for key in VirtualKey.objects.filter(id__in=ids)
            .select_related("team")
            .only("id", "name", "team__name")
        }
        if ids
        else {}
    )
    out = []
    for row in grouped:
        key = names.get(row["key_id"])
        out.append(
            KeyUsage(
                key_id=row["key_id"],
                name=key.name
                if key
                else ("(no key)" if row["key_id"] is None else "(deleted key)"),
                team_name=key.team.name if key else "",
                requests=row["requests"],
                spend_micro_usd=row["spend"] or 0,
            )
        )
    return out
