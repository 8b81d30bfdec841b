"""Liveness and readiness probes, as a load balancer or orchestrator calls them."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_it_answers_the_liveness_probe(live_gateway):
    response = httpx.get(f"{live_gateway.url}/health/live", timeout=10)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]


def test_it_is_ready_when_postgres_and_redis_answer(live_gateway):
    response = httpx.get(f"{live_gateway.url}/health/ready", timeout=10)

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}
    assert response.headers["x-request-id"]


def test_it_needs_no_key_for_the_probes(live_gateway):
    # Probes come from infrastructure that holds no virtual key.
    for path in ("/health/live", "/health/ready"):
        response = httpx.get(
            f"{live_gateway.url}{path}", headers={"authorization": "Bearer junk"}, timeout=10
        )
        assert response.status_code == 200, (path, response.text)
