from __future__ import annotations

import pytest
from openai import OpenAI

pytestmark = pytest.mark.e2e


def test_it_answers_a_chat_completion_and_writes_one_ledger_row(live_gateway, make_model, make_key):
    from billing.models import LedgerEntry

    model = make_model()
    issued = make_key()
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret)
    raw = client.chat.completions.with_raw_response.create(
        model=model.name, messages=[{"role": "user", "content": "Hello"}]
    )
    reply = raw.parse()
    assert reply.choices[0].message.content.startswith("Mock reply to: Hello")
    request_id = raw.headers["x-request-id"]
    row = LedgerEntry.objects.get(request_id=request_id)
    assert row.status == "success"
    assert row.prompt_tokens == reply.usage.prompt_tokens
    assert row.completion_tokens == reply.usage.completion_tokens
