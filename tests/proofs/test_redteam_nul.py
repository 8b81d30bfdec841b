"""A NUL character can never reach Postgres, which cannot store or search for one.

Found by the management-API fuzzer (`GET /api/admin/models?name=a%00b` answered 500).
On the data plane it was worse: a `user` or tag with a NUL made the ledger insert fail,
so the row went to the spool, whose replay then failed on it again and again.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from billing.models import LedgerEntry
from tests.support.live import LiveGateway

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"user": "a\x00b"}, "user"),
        ({"metadata": {"tags": ["ok", "t\x00ag"]}}, "metadata.tags"),
    ],
)
def test_a_nul_in_what_the_ledger_stores_is_refused_before_the_provider_is_called(
    live_gateway: LiveGateway, make_model: Any, make_key: Any, extra: dict[str, Any], param: str
) -> None:
    model = make_model()
    secret = make_key().secret
    body = {"model": model.name, "messages": [{"role": "user", "content": "hi"}], **extra}
    answer = httpx.post(
        f"{live_gateway.v1}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert not LedgerEntry.objects.filter(model=model.name).exists()


def test_a_messages_end_user_with_a_nul_is_refused(
    live_gateway: LiveGateway, make_model: Any, make_key: Any
) -> None:
    model = make_model()
    answer = httpx.post(
        f"{live_gateway.v1}/messages",
        json={
            "model": model.name,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"user_id": "u\x00"},
        },
        headers={"x-api-key": make_key().secret},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_a_nul_in_a_management_query_is_a_400_not_a_500(live_gateway: LiveGateway) -> None:
    with live_gateway.admin() as admin:
        answer = admin.get("/models", params={"name": "a\x00b"})
    assert answer.status_code == 400, answer.text
    assert "NUL" in answer.json()["error"]["message"]
