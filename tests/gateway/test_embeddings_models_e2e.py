"""POST /v1/embeddings and GET /v1/models[/{id}]: what a key can see and use."""

from __future__ import annotations

import base64
import re
import struct
from decimal import Decimal

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.http import assert_openai_error, content_of, unique
from tests.support.money import cost_micro_usd, usd_str

pytestmark = pytest.mark.e2e

DECIMAL_STRING = re.compile(r"^\d+(\.\d+)?$")


def sdk(live_gateway, secret: str) -> OpenAI:
    return OpenAI(base_url=live_gateway.v1, api_key=secret, max_retries=0)


# --- embeddings ----------------------------------------------------------------------------


def test_it_embeds_as_floats_through_the_sdk(live_gateway, make_model, make_key):
    model = make_model(name=unique("embed"))
    issued = make_key()

    raw = sdk(live_gateway, issued.secret).embeddings.with_raw_response.create(
        model=model.name, input=["first text", "second text"], encoding_format="float"
    )
    result = raw.parse()

    assert [item.index for item in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == 8
        assert all(isinstance(value, float) for value in item.embedding)
        assert abs(sum(value * value for value in item.embedding) - 1.0) < 1e-4
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0
    expected = cost_micro_usd(
        input_tokens=result.usage.prompt_tokens, output_tokens=0, prices=("1", "2")
    )
    assert raw.headers["x-gateway-cost-usd"] == usd_str(expected)
    assert raw.headers["x-request-id"]


def test_it_embeds_as_base64_with_the_same_vectors(live_gateway, make_model, make_key):
    model = make_model(name=unique("embed"))
    issued = make_key()
    client = sdk(live_gateway, issued.secret)

    floats = client.embeddings.create(model=model.name, input="same text", encoding_format="float")
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model=model.name, input="same text")
    raw = httpx.post(
        f"{live_gateway.v1}/embeddings",
        json={"model": model.name, "input": "same text", "encoding_format": "base64"},
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    )

    assert raw.status_code == 200, raw.text
    packed = raw.json()["data"][0]["embedding"]
    assert isinstance(packed, str)
    from_base64 = list(struct.unpack("<8f", base64.b64decode(packed)))
    assert from_base64 == floats.data[0].embedding
    assert decoded.data[0].embedding == floats.data[0].embedding


def test_it_refuses_an_embedding_request_without_input(live_gateway, make_model, make_key):
    model = make_model(name=unique("embed"))
    issued = make_key()

    response = httpx.post(
        f"{live_gateway.v1}/embeddings",
        json={"model": model.name},
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    )

    assert_openai_error(response, 400, type="invalid_request_error", param="input")


# --- models --------------------------------------------------------------------------------


def test_it_lists_only_the_models_a_key_may_use(live_gateway, make_model, make_key, make_team):
    allowed = make_model(name=unique("allowed"))
    other = make_model(name=unique("other"))
    team = make_team()
    restricted = make_key(team=team, allowed_models=[allowed.name])
    unrestricted = make_key(team=team)

    restricted_ids = [m.id for m in sdk(live_gateway, restricted.secret).models.list()]
    all_ids = [m.id for m in sdk(live_gateway, unrestricted.secret).models.list()]

    assert restricted_ids == [allowed.name]
    assert {allowed.name, other.name} <= set(all_ids)


def test_it_describes_each_model_with_limits_capabilities_and_prices(
    live_gateway, make_model, make_key
):
    model = make_model(
        name=unique("described"),
        input_cost_per_million=Decimal("0.15"),
        output_cost_per_million=Decimal("0.6"),
        cached_input_cost_per_million=Decimal("0.075"),
        context_length=128000,
        max_output_tokens=16384,
    )
    issued = make_key(allowed_models=[model.name])

    response = httpx.get(
        f"{live_gateway.v1}/models",
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    )

    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == model.name
    assert card["object"] == "model"
    assert isinstance(card["owned_by"], str) and card["owned_by"]
    assert card["context_length"] == 128000
    assert card["max_output_tokens"] == 16384
    capabilities = card["capabilities"]
    assert set(capabilities) == {
        "supports_function_calling",
        "supports_vision",
        "supports_streaming",
        "supports_structured_output",
    }
    assert all(isinstance(value, bool) for value in capabilities.values())
    assert capabilities["supports_streaming"] is True
    pricing = card["pricing"]
    assert pricing["currency"] == "USD"
    assert pricing["unit"]
    for kind in ("input", "output", "cached_input"):
        assert isinstance(pricing[kind], str), pricing
        assert DECIMAL_STRING.match(pricing[kind]), pricing
    assert Decimal(pricing["input"]) == Decimal("0.15")
    assert Decimal(pricing["output"]) == Decimal("0.6")
    assert Decimal(pricing["cached_input"]) == Decimal("0.075")


def test_it_shows_a_tiny_price_as_a_plain_decimal(live_gateway, make_model, make_key):
    model = make_model(
        name=unique("tiny"),
        input_cost_per_million=Decimal("0.000001"),
        output_cost_per_million=Decimal("0.00002"),
    )
    issued = make_key(allowed_models=[model.name])

    card = httpx.get(
        f"{live_gateway.v1}/models/{model.name}",
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    ).json()

    assert card["pricing"]["input"] == "0.000001"
    assert card["pricing"]["output"] == "0.00002"


def test_it_retrieves_one_model_the_key_may_use(live_gateway, make_model, make_key):
    model = make_model(name=unique("single"))
    issued = make_key()

    described = sdk(live_gateway, issued.secret).models.retrieve(model.name)

    assert described.id == model.name
    assert described.object == "model"


def test_it_retrieves_a_model_whose_name_has_a_slash(live_gateway, make_model, make_key):
    name = f"{unique('org')}/chat-model"
    model = make_model(name=name, provider_model=f"openai/{name.replace('/', '-')}")
    issued = make_key()

    described = sdk(live_gateway, issued.secret).models.retrieve(model.name)
    reply = sdk(live_gateway, issued.secret).chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "Hi"}]
    )

    assert described.id == name
    assert content_of(reply).startswith("Mock reply to: Hi")


def test_it_hides_a_model_the_key_may_not_use(live_gateway, make_model, make_key):
    allowed = make_model(name=unique("allowed"))
    hidden = make_model(name=unique("hidden"))
    issued = make_key(allowed_models=[allowed.name])

    with pytest.raises(openai.NotFoundError) as caught:
        sdk(live_gateway, issued.secret).models.retrieve(hidden.name)
    response = httpx.get(
        f"{live_gateway.v1}/models/{hidden.name}",
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    )

    assert caught.value.status_code == 404
    assert_openai_error(response, 404, code="model_not_found", param="model")


def test_it_answers_404_for_a_model_that_does_not_exist(live_gateway, make_key):
    issued = make_key()

    response = httpx.get(
        f"{live_gateway.v1}/models/{unique('no-such-model')}",
        headers={"authorization": f"Bearer {issued.secret}"},
        timeout=30,
    )

    assert_openai_error(response, 404, code="model_not_found")


def test_it_refuses_to_list_models_without_a_key(live_gateway):
    listing = httpx.get(f"{live_gateway.v1}/models", timeout=30)
    one = httpx.get(f"{live_gateway.v1}/models/anything", timeout=30)

    assert_openai_error(listing, 401, code="missing_api_key")
    assert_openai_error(one, 401, code="missing_api_key")
