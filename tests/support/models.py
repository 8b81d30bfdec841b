"""Deployments on the mock upstream and routing policies, set up as the admin would."""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.http import unique

# The model string an Anthropic-dialect deployment sends upstream (plus its controls).
CLAUDE = "claude-3-5-haiku-20241022"


def openai_deployment(
    make_model: Any, name: str | None = None, controls: str = "", **fields: Any
) -> Any:
    """An OpenAI-dialect deployment on the mock; `controls` like ";status=500".

    The upstream model string is unique (so the mock's per-model counts belong to this
    test) even when several deployments share one public `name`.
    """
    name = name or unique("m")
    upstream = f"{unique(name)}{controls}"
    return make_model(name=name, provider_model=f"openai/{upstream}", **fields)


def anthropic_deployment(
    make_model: Any, mock_upstream: Any, name: str | None = None, controls: str = "", **fields: Any
) -> Any:
    """An Anthropic-dialect deployment on the mock (the gateway appends /v1/messages).

    `;id=…` is a control the mock ignores: it only makes the model string unique.
    """
    name = name or unique("claude")
    fields.setdefault("api_base", mock_upstream.url)
    provider_model = f"anthropic/{CLAUDE};id={uuid.uuid4().hex[:12]}{controls}"
    return make_model(name=name, provider_model=provider_model, **fields)


def put_group(live_gateway: Any, name: str, **policy: Any) -> dict[str, Any]:
    """Set a model's routing policy through the management API."""
    with live_gateway.admin() as admin:
        response = admin.put(f"/model-groups/{name}", json=policy)
    assert response.status_code == 200, response.text
    return dict(response.json())
