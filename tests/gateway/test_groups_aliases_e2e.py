"""Aliases and model groups through the management API, and how groups spread traffic.

A model group is every deployment sharing one public name; its routing policy (strategy,
fallbacks, retries, cooldown) is set with PUT /api/admin/model-groups/{name}.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.support.http import assert_openai_error, chat_body, openai_sdk, unique
from tests.support.models import openai_deployment, put_group
from tests.support.money import ledger, upstream_name
from tests.support.waiting import fresh_minute

pytestmark = pytest.mark.e2e


def send_chats(live_gateway: Any, secret: str, model: str, count: int) -> list[httpx.Response]:
    with httpx.Client(
        base_url=live_gateway.v1, headers={"authorization": f"Bearer {secret}"}, timeout=30
    ) as client:
        return [client.post("/chat/completions", json=chat_body(model)) for _ in range(count)]


def model_ids(live_gateway: Any, secret: str) -> set[str]:
    return {model.id for model in openai_sdk(live_gateway, secret).models.list()}


# --- aliases ---------------------------------------------------------------------------------


def test_it_serves_an_alias_under_its_own_name(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    target = openai_deployment(make_model)
    other = openai_deployment(make_model)
    alias = unique("alias")
    with live_gateway.admin() as admin:
        created = admin.post("/aliases", json={"alias": alias, "target": target.name})
        unknown = admin.post("/aliases", json={"alias": unique("alias"), "target": unique("nope")})
        again = admin.post("/aliases", json={"alias": alias, "target": target.name})
        itself = admin.post("/aliases", json={"alias": target.name, "target": target.name})
        shadowing = admin.post("/aliases", json={"alias": other.name, "target": target.name})
    assert created.status_code == 201, created.text
    # An alias is a new name: never a second definition, never a model's own name, and
    # never a name pointing at itself (a malformed request, so 400 rather than 409).
    assert again.status_code == 409, again.text
    assert_openai_error(shadowing, 409, "conflict", param="alias")
    assert_openai_error(itself, 400, param="target")
    assert created.json()["alias"] == alias and created.json()["target"] == target.name
    assert unknown.status_code == 400, unknown.text

    alice = make_key()
    assert {alias, target.name} <= model_ids(live_gateway, alice.secret)
    raw = openai_sdk(live_gateway, alice.secret).chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": "Hello alias"}]
    )

    assert raw.parse().choices[0].message.content
    assert raw.headers["x-gateway-model"] == target.provider_model
    [row] = ledger(raw.headers["x-request-id"])
    # Billed under the name the client used; the deployment says what really answered.
    assert row.model == alias
    assert row.provider_model == target.provider_model
    assert row.charged_cost_micro_usd > 0
    assert mock_upstream.calls(upstream_name(target)) == 1


def test_it_refuses_an_alias_to_an_outsider(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    target = openai_deployment(make_model)
    other = openai_deployment(make_model)
    alias = unique("alias")
    with live_gateway.admin() as admin:
        assert (
            admin.post("/aliases", json={"alias": alias, "target": target.name}).status_code == 201
        )
    charlie = make_key(allowed_models=[other.name])

    response = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json=chat_body(alias),
        headers={"authorization": f"Bearer {charlie.secret}"},
        timeout=30,
    )

    assert_openai_error(response, 403, "model_not_allowed")
    assert alias not in model_ids(live_gateway, charlie.secret)
    assert mock_upstream.calls(upstream_name(target)) == 0
    # A key allowed the target may use its alias too.
    bob = make_key(allowed_models=[target.name])
    allowed = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json=chat_body(alias),
        headers={"authorization": f"Bearer {bob.secret}"},
        timeout=30,
    )
    assert allowed.status_code == 200, allowed.text


def test_it_lists_and_describes_an_alias_to_every_key_that_may_call_it(
    live_gateway: Any, make_model: Any, make_key: Any
) -> None:
    target = openai_deployment(make_model)
    alias = unique("alias")
    with live_gateway.admin() as admin:
        created = admin.post("/aliases", json={"alias": alias, "target": target.name})
        assert created.status_code == 201, created.text
    bob = make_key(allowed_models=[target.name])
    headers = {"authorization": f"Bearer {bob.secret}"}

    called = httpx.post(
        f"{live_gateway.v1}/chat/completions", json=chat_body(alias), headers=headers, timeout=30
    )
    described = httpx.get(f"{live_gateway.v1}/models/{alias}", headers=headers, timeout=30)

    # Bob may call the alias (it serves a model he is allowed), so /v1/models, which
    # "lists the models your key can use", must show it, and describe it on request.
    assert called.status_code == 200, called.text
    assert alias in model_ids(live_gateway, bob.secret)
    assert described.status_code == 200, described.text
    assert described.json()["id"] == alias


# --- group policies ----------------------------------------------------------------------------


def test_it_saves_a_routing_policy_and_refuses_unknown_fallbacks(
    live_gateway: Any, make_model: Any
) -> None:
    primary = openai_deployment(make_model)
    backup = openai_deployment(make_model)
    bigger = openai_deployment(make_model)
    policy = {
        "routing_strategy": "least-busy",
        "fallbacks": [backup.name],
        "context_window_fallbacks": [bigger.name],
        "content_policy_fallbacks": [backup.name],
        "num_retries": 4,
        "retry_backoff_seconds": 0.25,
        "max_retry_after_seconds": 7.0,
        "allowed_fails": 5,
        "cooldown_seconds": 12.5,
    }

    saved = put_group(live_gateway, primary.name, **policy)

    assert saved["name"] == primary.name
    assert {k: saved[k] for k in policy} == policy
    with live_gateway.admin() as admin:
        fetched = admin.get(f"/model-groups/{primary.name}")
        assert fetched.status_code == 200
        assert {k: fetched.json()[k] for k in policy} == policy
        for field in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            missing = unique("missing")
            refused = admin.put(f"/model-groups/{primary.name}", json={field: [missing]})
            assert refused.status_code == 400, (field, refused.text)
            assert missing in refused.text
        # A refused update changed nothing.
        assert {k: admin.get(f"/model-groups/{primary.name}").json()[k] for k in policy} == policy
        no_model = admin.put(f"/model-groups/{unique('nope')}", json={"num_retries": 1})
        assert no_model.status_code == 404, no_model.text
        bad_strategy = admin.put(
            f"/model-groups/{primary.name}", json={"routing_strategy": "round-the-houses"}
        )
        assert bad_strategy.status_code == 400, bad_strategy.text


# --- strategies ---------------------------------------------------------------------------------


def test_it_spreads_traffic_by_weight(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    name = unique("weighted")
    heavy = openai_deployment(make_model, name=name, weight=9)
    light = openai_deployment(make_model, name=name, weight=1)
    alice = make_key()

    responses = send_chats(live_gateway, alice.secret, name, 100)

    assert [r.status_code for r in responses] == [200] * 100
    heavy_calls = mock_upstream.calls(upstream_name(heavy))
    light_calls = mock_upstream.calls(upstream_name(light))
    assert heavy_calls + light_calls == 100
    # 90 expected; 70 is many standard deviations (3) away.
    assert heavy_calls > 70, (heavy_calls, light_calls)
    # Shuffled, not pinned: the light one gets some (P(none) = 0.9^100, about 3e-5).
    assert light_calls >= 1, (heavy_calls, light_calls)
    served_by = {r.headers["x-gateway-model"] for r in responses}
    assert served_by == {heavy.provider_model, light.provider_model}


def test_it_prefers_the_faster_deployment_with_latency_routing(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    name = unique("latency")
    slow = openai_deployment(make_model, name=name, controls=";latency_ms=150")
    fast = openai_deployment(make_model, name=name)
    put_group(live_gateway, name, routing_strategy="latency-based-routing")
    alice = make_key()

    responses = send_chats(live_gateway, alice.secret, name, 24)

    assert [r.status_code for r in responses] == [200] * 24
    slow_calls = mock_upstream.calls(upstream_name(slow))
    fast_calls = mock_upstream.calls(upstream_name(fast))
    assert slow_calls + fast_calls == 24
    # Warm-up tries the slow one once or twice; after that it is measured as slower.
    # (Without latency routing it would get about half: 12.)
    assert slow_calls <= 4, (slow_calls, fast_calls)
    last = [r.headers["x-gateway-model"] for r in responses[-10:]]
    assert last.count(fast.provider_model) >= 8, last


def test_it_prefers_the_cheaper_deployment_with_cost_routing(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    name = unique("cost")
    pricey = openai_deployment(
        make_model,
        name=name,
        input_cost_per_million=Decimal("5.00"),
        output_cost_per_million=Decimal("15.00"),
    )
    cheap = openai_deployment(
        make_model,
        name=name,
        input_cost_per_million=Decimal("0.10"),
        output_cost_per_million=Decimal("0.40"),
    )
    put_group(live_gateway, name, routing_strategy="cost-based-routing")
    alice = make_key()

    responses = send_chats(live_gateway, alice.secret, name, 12)

    assert [r.status_code for r in responses] == [200] * 12
    assert mock_upstream.calls(upstream_name(pricey)) == 0
    assert mock_upstream.calls(upstream_name(cheap)) == 12
    [row] = ledger(responses[0].headers["x-request-id"])
    assert row.provider_model == cheap.provider_model


# --- per-deployment rate limits ---------------------------------------------------------------


def test_it_routes_around_a_deployment_at_its_rpm_limit(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    name = unique("rpm")
    limited = openai_deployment(make_model, name=name, rpm_limit=2)
    roomy = openai_deployment(make_model, name=name)
    alice = make_key()
    fresh_minute()

    responses = send_chats(live_gateway, alice.secret, name, 12)

    assert [r.status_code for r in responses] == [200] * 12
    limited_calls = mock_upstream.calls(upstream_name(limited))
    roomy_calls = mock_upstream.calls(upstream_name(roomy))
    assert limited_calls <= 2, (limited_calls, roomy_calls)
    assert limited_calls + roomy_calls == 12


def test_it_refuses_when_the_only_deployment_is_at_its_rpm_limit(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    lone = openai_deployment(make_model, rpm_limit=2)
    alice = make_key()
    fresh_minute()

    responses = send_chats(live_gateway, alice.secret, lone.name, 3)

    assert [r.status_code for r in responses[:2]] == [200, 200]
    assert_openai_error(responses[2], 503, "no_deployment_available")
    assert responses[2].headers.get("retry-after")
    assert mock_upstream.calls(upstream_name(lone)) == 2
    # The refused request reached no provider, so it costs nothing and has no ledger row.
    assert ledger(responses[2].headers["x-request-id"]) == []


def test_it_falls_back_when_the_only_deployment_is_at_its_rpm_limit(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    lone = openai_deployment(make_model, rpm_limit=1)
    backup = openai_deployment(make_model)
    put_group(live_gateway, lone.name, fallbacks=[backup.name])
    alice = make_key()
    fresh_minute()

    first, second = send_chats(live_gateway, alice.secret, lone.name, 2)

    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert first.headers["x-gateway-model"] == lone.provider_model
    assert second.headers["x-gateway-model"] == backup.provider_model
    assert mock_upstream.calls(upstream_name(lone)) == 1
    assert mock_upstream.calls(upstream_name(backup)) == 1
    [row] = ledger(second.headers["x-request-id"])
    assert (row.model, row.provider_model) == (lone.name, backup.provider_model)


def test_it_applies_the_targets_policy_to_an_alias_and_accepts_an_alias_as_fallback(
    live_gateway: Any, mock_upstream: Any, make_model: Any, make_key: Any
) -> None:
    broken = openai_deployment(make_model, controls=";status=500")
    backup = openai_deployment(make_model)
    broken_alias, backup_alias = unique("alias"), unique("alias")
    with live_gateway.admin() as admin:
        for alias, target in ((broken_alias, broken), (backup_alias, backup)):
            created = admin.post("/aliases", json={"alias": alias, "target": target.name})
            assert created.status_code == 201, created.text
    put_group(
        live_gateway, broken.name, fallbacks=[backup_alias], num_retries=0, retry_backoff_seconds=0
    )
    alice = make_key()

    response = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json=chat_body(broken_alias),
        headers={"authorization": f"Bearer {alice.secret}"},
        timeout=30,
    )

    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-model"] == backup.provider_model
    rows = ledger(response.headers["x-request-id"])
    assert [(r.model, r.provider_model, r.status) for r in rows] == [
        (broken_alias, broken.provider_model, "error"),
        (broken_alias, backup.provider_model, "success"),
    ]

    with live_gateway.admin() as admin:
        assert admin.delete(f"/aliases/{broken_alias}").status_code == 204
    assert broken_alias not in model_ids(live_gateway, alice.secret)
    gone = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json=chat_body(broken_alias),
        headers={"authorization": f"Bearer {alice.secret}"},
        timeout=30,
    )
    assert_openai_error(gone, 404, "model_not_found")
