"""The management API under /api/admin: models, teams and keys, as an operator drives it."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone
from openai import OpenAI

from tests.support.http import assert_openai_error, chat, check_each, content_of, unique

pytestmark = pytest.mark.e2e

PAGE_FIELDS = {"items", "count", "limit", "offset"}


@pytest.fixture
def admin(live_gateway):
    with live_gateway.admin() as client:
        yield client


def model_payload(mock_upstream, **fields) -> dict:
    name = fields.pop("name", None) or unique("api-model")
    return {
        "name": name,
        "provider_model": f"openai/{name}",
        "api_base": mock_upstream.api_base,
        "input_cost_per_million": "1.5",
        "output_cost_per_million": "3",
        **fields,
    }


def create_team(admin: httpx.Client, **fields) -> dict:
    response = admin.post("/teams", json={"name": unique("team"), **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


def create_key(admin: httpx.Client, team_id: int, **fields) -> dict:
    response = admin.post("/keys", json={"team_id": team_id, "name": "svc", **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


# --- authentication ---------------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/api/admin/models", None),
    ("POST", "/api/admin/models", {"name": "x", "provider_model": "openai/x"}),
    ("GET", "/api/admin/teams", None),
    ("POST", "/api/admin/teams", {"name": "sneaky"}),
    ("GET", "/api/admin/keys", None),
    ("DELETE", "/api/admin/keys/1", None),
    ("POST", "/api/admin/keys/1/rotate", {"grace_period_seconds": 0}),
]


def test_it_refuses_the_management_api_without_the_admin_token(live_gateway, make_key):
    credentials = {
        "none": {},
        "wrong-token": {"authorization": "Bearer not-the-admin-token"},
        "virtual-key": {"authorization": f"Bearer {make_key().secret}"},
        "basic": {"authorization": "Basic YWRtaW46YWRtaW4="},
        "admin-token-without-bearer": {"authorization": live_gateway.env["GATEWAY_ADMIN_TOKEN"]},
    }

    def check(case: tuple) -> None:
        (method, path, body), credential = case
        response = httpx.request(
            method,
            f"{live_gateway.url}{path}",
            json=body,
            headers=credentials[credential],
            timeout=30,
        )
        assert_openai_error(response, 401)

    check_each([(call, name) for call in ADMIN_CALLS for name in credentials], check)


def test_it_creates_nothing_for_a_refused_caller(live_gateway, admin):
    name = unique("sneaky")

    response = httpx.post(
        f"{live_gateway.url}/api/admin/teams",
        json={"name": name},
        headers={"authorization": "Bearer wrong"},
    )

    assert response.status_code == 401
    listed = admin.get("/teams", params={"limit": 500}).json()
    assert name not in [team["name"] for team in listed["items"]]


# --- models -------------------------------------------------------------------------------------


def test_it_creates_a_model_and_never_returns_its_api_key(admin, mock_upstream):
    provider_key = f"sk-provider-{uuid.uuid4().hex}"
    payload = model_payload(mock_upstream, api_key=provider_key, context_length=32000)

    created = admin.post("/models", json=payload)

    assert created.status_code == 201, created.text
    body = created.json()
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert body["name"] == payload["name"]
    assert body["provider_model"] == payload["provider_model"]
    assert body["has_api_key"] is True
    assert body["context_length"] == 32000
    assert "api_key" not in body
    assert provider_key not in created.text
    fetched = admin.get(f"/models/{body['id']}")
    listed = admin.get("/models", params={"limit": 500})
    assert fetched.status_code == 200
    assert fetched.json()["id"] == body["id"]
    assert provider_key not in fetched.text
    assert provider_key not in listed.text


def test_it_creates_a_model_without_an_api_key(admin, mock_upstream):
    created = admin.post("/models", json=model_payload(mock_upstream))

    assert created.status_code == 201, created.text
    assert created.json()["has_api_key"] is False


def test_it_lists_models_a_page_at_a_time(admin, mock_upstream):
    ids = [admin.post("/models", json=model_payload(mock_upstream)).json()["id"] for _ in range(3)]

    everything = admin.get("/models").json()
    first = admin.get("/models", params={"limit": 2, "offset": 0}).json()
    rest = admin.get("/models", params={"limit": 2, "offset": 2}).json()
    by_name = admin.get("/models", params={"name": everything["items"][0]["name"]}).json()

    assert set(everything) == PAGE_FIELDS
    assert everything["count"] == 3
    assert {item["id"] for item in everything["items"]} == set(ids)
    assert (first["limit"], first["offset"], len(first["items"])) == (2, 0, 2)
    assert (rest["offset"], len(rest["items"])) == (2, 1)
    assert {i["id"] for i in first["items"]} | {i["id"] for i in rest["items"]} == set(ids)
    assert first["count"] == rest["count"] == 3
    assert by_name["count"] == 1


def test_it_refuses_a_bad_page(admin):
    def check(params: dict) -> None:
        response = admin.get("/models", params=params)
        assert_openai_error(response, 400, param=next(iter(params)))

    check_each([{"limit": 0}, {"limit": 100000}, {"offset": -1}, {"limit": "ten"}], check)


def test_the_data_plane_serves_a_model_created_through_the_api(
    live_gateway, admin, make_key, mock_upstream
):
    issued = make_key()
    payload = model_payload(mock_upstream)
    client = OpenAI(base_url=live_gateway.v1, api_key=issued.secret, max_retries=0)

    created = admin.post("/models", json=payload)
    reply = client.chat.completions.create(
        model=payload["name"], messages=[{"role": "user", "content": "Hello"}]
    )

    assert created.status_code == 201, created.text
    assert content_of(reply).startswith("Mock reply to: Hello")
    assert mock_upstream.calls(payload["name"]) == 1
    assert payload["name"] in [m.id for m in client.models.list()]


def test_it_updates_a_model_and_the_data_plane_follows(
    live_gateway, admin, make_key, mock_upstream
):
    issued = make_key()
    created = admin.post("/models", json=model_payload(mock_upstream)).json()
    auth = {"authorization": f"Bearer {issued.secret}"}

    patched = admin.patch(
        f"/models/{created['id']}",
        json={"input_cost_per_million": "4.25", "max_output_tokens": 777},
    )
    card = httpx.get(f"{live_gateway.v1}/models/{created['name']}", headers=auth).json()

    assert patched.status_code == 200, patched.text
    assert patched.json()["input_cost_per_million"] == "4.25"
    assert patched.json()["output_cost_per_million"] == "3"
    assert patched.json()["max_output_tokens"] == 777
    assert card["pricing"]["input"] == "4.25"
    assert card["max_output_tokens"] == 777


def test_it_replaces_a_model_with_put(admin, mock_upstream):
    created = admin.post("/models", json=model_payload(mock_upstream)).json()
    replacement = model_payload(
        mock_upstream, name=created["name"], input_cost_per_million="9", api_key="sk-new-key"
    )

    replaced = admin.put(f"/models/{created['id']}", json=replacement)

    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["input_cost_per_million"] == "9"
    assert replaced.json()["has_api_key"] is True
    assert "sk-new-key" not in replaced.text
    assert admin.get(f"/models/{created['id']}").json()["input_cost_per_million"] == "9"


def test_it_deletes_a_model_and_the_data_plane_forgets_it(
    live_gateway, admin, make_key, mock_upstream
):
    issued = make_key()
    created = admin.post("/models", json=model_payload(mock_upstream)).json()
    body = {"model": created["name"], "messages": [{"role": "user", "content": "Hi"}]}
    assert chat(live_gateway.v1, issued.secret, body).status_code == 200

    deleted = admin.delete(f"/models/{created['id']}")
    fetched = admin.get(f"/models/{created['id']}")
    served = chat(live_gateway.v1, issued.secret, body)

    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_openai_error(fetched, 404)
    assert_openai_error(served, 404, code="model_not_found")


def test_it_answers_404_for_a_model_that_does_not_exist(admin):
    def check(model_id: str) -> None:
        assert_openai_error(admin.get(f"/models/{model_id}"), 404)
        assert_openai_error(admin.patch(f"/models/{model_id}", json={"weight": 2}), 404)
        assert_openai_error(admin.delete(f"/models/{model_id}"), 404)

    check_each([str(uuid.uuid4()), "not-a-uuid"], check)


def test_it_refuses_a_provider_model_litellm_cannot_route(admin, mock_upstream):
    def check(provider_model: str) -> None:
        payload = model_payload(mock_upstream, provider_model=provider_model)
        response = admin.post("/models", json=payload)
        assert_openai_error(response, 400, param="provider_model")
        assert admin.get("/models", params={"name": payload["name"]}).json()["count"] == 0

    check_each(["nonsense-provider-xyz/foo", "", "no-slash-at-all-xyz"], check)


def test_it_refuses_a_bad_provider_model_on_update(admin, mock_upstream):
    created = admin.post("/models", json=model_payload(mock_upstream)).json()

    response = admin.patch(
        f"/models/{created['id']}", json={"provider_model": "nonsense-provider-xyz/foo"}
    )

    assert_openai_error(response, 400, param="provider_model")
    assert (
        admin.get(f"/models/{created['id']}").json()["provider_model"] == created["provider_model"]
    )


def test_it_names_the_field_of_an_invalid_model(admin, mock_upstream):
    def check(case: tuple[str, object]) -> None:
        field, value = case
        payload = model_payload(mock_upstream)
        payload[field] = value
        response = admin.post("/models", json=payload)
        assert_openai_error(response, 400, type="invalid_request_error", param=field)

    check_each(
        [
            ("input_cost_per_million", "-1"),
            ("output_cost_per_million", "lots"),
            ("api_base", "ftp://example.com/v1"),
            ("api_base", "not a url"),
            ("timeout_seconds", 0),
            ("context_length", "big"),
            ("weight", -1),
            ("name", ""),
        ],
        check,
    )
    assert admin.get("/models").json()["count"] == 0


def test_it_names_a_missing_required_field(admin, mock_upstream):
    payload = model_payload(mock_upstream)
    del payload["provider_model"]

    response = admin.post("/models", json=payload)

    assert_openai_error(response, 400, param="provider_model")


def test_it_refuses_an_admin_body_that_is_not_json(admin):
    response = admin.post(
        "/models", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert_openai_error(response, 400, type="invalid_request_error")


# --- teams --------------------------------------------------------------------------------------


def test_it_creates_a_team(admin):
    name = unique("team")

    response = admin.post("/teams", json={"name": name})

    assert response.status_code == 201, response.text
    body = response.json()
    assert isinstance(body["id"], int)
    assert body["name"] == name
    assert body["budget_usd"] is None


def test_it_shows_a_team_budget_as_a_six_place_decimal_string(admin):
    def check(case: tuple[object, str]) -> None:
        sent, shown = case
        response = admin.post("/teams", json={"name": unique("team"), "budget_usd": sent})
        assert response.status_code == 201, response.text
        assert response.json()["budget_usd"] == shown
        assert admin.get(f"/teams/{response.json()['id']}").json()["budget_usd"] == shown

    check_each(
        [("12.5", "12.500000"), (12.5, "12.500000"), ("0.000001", "0.000001"), ("0", "0.000000")],
        check,
    )


def test_it_refuses_a_duplicate_team_name(admin):
    team = create_team(admin)

    response = admin.post("/teams", json={"name": team["name"]})

    assert_openai_error(response, 409)


def test_it_refuses_to_rename_a_team_to_a_taken_name(admin):
    first = create_team(admin)
    second = create_team(admin)

    response = admin.patch(f"/teams/{second['id']}", json={"name": first["name"]})

    assert_openai_error(response, 409)


def test_it_lists_gets_and_updates_teams(admin):
    team = create_team(admin)

    listed = admin.get("/teams").json()
    fetched = admin.get(f"/teams/{team['id']}")
    patched = admin.patch(
        f"/teams/{team['id']}", json={"budget_usd": "3", "budget_period": "daily"}
    )
    cleared = admin.patch(f"/teams/{team['id']}", json={"budget_usd": None})

    assert set(listed) == PAGE_FIELDS
    assert team["id"] in [item["id"] for item in listed["items"]]
    assert fetched.status_code == 200
    assert fetched.json()["name"] == team["name"]
    assert patched.status_code == 200, patched.text
    assert patched.json()["budget_usd"] == "3.000000"
    assert patched.json()["budget_period"] == "daily"
    assert cleared.json()["budget_usd"] is None


def test_it_names_the_field_of_an_invalid_team(admin):
    def check(case: tuple[str, object]) -> None:
        field, value = case
        response = admin.post("/teams", json={"name": unique("team"), field: value})
        assert_openai_error(response, 400, type="invalid_request_error", param=field)

    check_each(
        [
            ("budget_usd", "-1"),
            ("budget_usd", "twelve"),
            ("budget_period", "hourly"),
            ("timezone", "Mars/Olympus"),
            ("markup_percent", "5000"),
            ("name", ""),
        ],
        check,
    )
    assert admin.get("/teams").json()["count"] == 0


def test_it_shows_a_resource_the_same_way_on_create_get_and_list(admin, mock_upstream):
    # A client that stores what POST returned must be able to compare it with a later GET.
    team = create_team(admin, markup_percent="12.5", budget_usd="7")
    model = admin.post("/models", json=model_payload(mock_upstream)).json()
    key = create_key(admin, team["id"])
    del key["key"]

    fetched_team = admin.get(f"/teams/{team['id']}").json()
    listed_team = next(t for t in admin.get("/teams").json()["items"] if t["id"] == team["id"])
    fetched_model = admin.get(f"/models/{model['id']}").json()
    fetched_key = admin.get(f"/keys/{key['id']}").json()

    differences = {
        f"{kind}.{field}": (created[field], shown.get(field))
        for kind, created, shown in [
            ("team (get)", team, fetched_team),
            ("team (list)", team, listed_team),
            ("model (get)", model, fetched_model),
            ("key (get)", key, fetched_key),
        ]
        for field in created
        if created[field] != shown.get(field)
    }
    assert differences == {}


def test_it_deletes_a_team(admin):
    team = create_team(admin)

    deleted = admin.delete(f"/teams/{team['id']}")

    assert deleted.status_code == 204
    assert_openai_error(admin.get(f"/teams/{team['id']}"), 404)


def test_it_refuses_to_delete_a_team_with_active_keys(admin):
    team = create_team(admin)
    key = create_key(admin, team["id"])

    refused = admin.delete(f"/teams/{team['id']}")
    admin.delete(f"/keys/{key['id']}")
    after_revoking = admin.delete(f"/teams/{team['id']}")

    assert_openai_error(refused, 409)
    assert after_revoking.status_code == 204


def test_it_answers_404_for_a_team_that_does_not_exist(admin):
    assert_openai_error(admin.get("/teams/987654321"), 404)
    assert_openai_error(admin.patch("/teams/987654321", json={"rpm_limit": 5}), 404)
    assert_openai_error(admin.delete("/teams/987654321"), 404)


# --- keys ----------------------------------------------------------------------------------------


def test_it_issues_a_key_and_shows_its_secret_only_once(live_gateway, admin, make_model):
    model = make_model()
    team = create_team(admin)
    expires = (timezone.now() + timedelta(days=30)).replace(microsecond=0)

    created = create_key(
        admin,
        team["id"],
        models=[model.name],
        expires_at=expires.isoformat(),
        metadata={"owner": "alice"},
    )
    secret = created["key"]
    fetched = admin.get(f"/keys/{created['id']}")
    listed = admin.get("/keys", params={"team_id": team["id"]})
    everything = admin.get("/keys", params={"limit": 500})

    assert secret.startswith("sk-gw-")
    assert len(secret) >= 6 + 43
    assert created["team_id"] == team["id"]
    assert created["models"] == [model.name]
    assert created["metadata"] == {"owner": "alice"}
    assert created["revoked"] is False
    assert fetched.status_code == 200
    assert fetched.json()["id"] == created["id"]
    assert [item["id"] for item in listed.json()["items"]] == [created["id"]]
    for response in (fetched, listed, everything):
        assert secret not in response.text
        assert secret[6:] not in response.text
    assert "key" not in fetched.json()
    reply = chat(
        live_gateway.v1,
        secret,
        {"model": model.name, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert reply.status_code == 200, reply.text


def test_it_issues_distinct_random_secrets(admin):
    team = create_team(admin)

    secrets = {create_key(admin, team["id"])["key"] for _ in range(5)}

    assert len(secrets) == 5
    assert len({secret[6:12] for secret in secrets}) == 5


def test_it_revokes_a_key(admin):
    team = create_team(admin)
    key = create_key(admin, team["id"])

    revoked = admin.delete(f"/keys/{key['id']}")
    again = admin.delete(f"/keys/{key['id']}")
    revoked_list = admin.get("/keys", params={"team_id": team["id"], "revoked": True}).json()
    active_list = admin.get("/keys", params={"team_id": team["id"], "revoked": False}).json()

    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked"] is True
    assert revoked.json()["revoked_at"]
    assert again.status_code == 200
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert [item["id"] for item in revoked_list["items"]] == [key["id"]]
    assert active_list["items"] == []
    assert key["key"] not in revoked.text


def test_it_refuses_a_key_for_a_team_that_does_not_exist(admin):
    response = admin.post("/keys", json={"team_id": 987654321, "name": "ghost"})

    # The team is an object that does not exist (as on GET /teams/{id}): 404, naming the field.
    assert_openai_error(response, 404, "not_found", param="team_id")


def test_it_names_the_field_of_an_invalid_key(admin):
    team = create_team(admin)

    def check(case: tuple[str, object]) -> None:
        field, value = case
        body = {"team_id": team["id"], "name": "svc", field: value}
        response = admin.post("/keys", json=body)
        assert_openai_error(response, 400, type="invalid_request_error", param=field)

    check_each(
        [
            ("team_id", None),
            ("name", ""),
            ("models", "gpt-4o"),
            ("expires_at", "next tuesday"),
            ("max_budget_usd", "-3"),
            ("rpm_limit", 0),
        ],
        check,
    )
    assert admin.get("/keys", params={"team_id": team["id"]}).json()["count"] == 0


# --- OpenAPI and docs ---------------------------------------------------------------------------


def test_it_publishes_an_openapi_schema_and_docs(live_gateway):
    schema = httpx.get(f"{live_gateway.url}/api/openapi.json", timeout=30)
    docs = httpx.get(f"{live_gateway.url}/api/docs", timeout=30)

    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/api/admin/models",
        "/api/admin/models/{model_id}",
        "/api/admin/teams",
        "/api/admin/keys",
        "/api/admin/keys/{key_id}/rotate",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
    ):
        assert path in paths, sorted(paths)
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
