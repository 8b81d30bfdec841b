"""Unit tests of the one error type and its two wire shapes (core/errors.py, core/http.py)."""

from __future__ import annotations

import orjson
import pytest

from core.errors import GatewayError, invalid_request
from core.http import dialect_for_path, error_response


def test_it_renders_the_openai_shape_with_every_field() -> None:
    error = GatewayError("Bad n.", 400, "invalid_request_error", "invalid_parameter", "n")

    assert error.openai_body() == {
        "error": {
            "message": "Bad n.",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_parameter",
        }
    }


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
        (418, "api_error"),
    ],
)
def test_it_names_the_anthropic_error_type_by_status(status: int, kind: str) -> None:
    body = GatewayError("No.", status).anthropic_body()

    assert body == {"type": "error", "error": {"type": kind, "message": "No."}}


def test_invalid_request_is_a_400_of_type_invalid_request_error() -> None:
    error = invalid_request("Fix it.", param="model", code="x")

    assert (error.status, error.type, error.code, error.param) == (
        400,
        "invalid_request_error",
        "x",
        "model",
    )


def test_it_renders_a_response_in_the_dialect_of_the_path_with_the_errors_headers() -> None:
    error = GatewayError("Slow down.", 429, "rate_limit_error", headers={"retry-after": "3"})

    openai = error_response(error, dialect=dialect_for_path("/v1/chat/completions"))
    anthropic = error_response(error, dialect=dialect_for_path("/v1/messages"))

    assert (openai.status_code, openai["retry-after"], openai["content-type"]) == (
        429,
        "3",
        "application/json",
    )
    assert orjson.loads(openai.content)["error"]["type"] == "rate_limit_error"
    assert orjson.loads(anthropic.content) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Slow down."},
    }
