"""Errors the gateway answers with, and how they are rendered.

Services raise `GatewayError`s; the HTTP edges render them once, through
`core.http.error_response`, in the OpenAI shape `{"error": {"message", "type",
"param", "code"}}` or, on /v1/messages, in the Anthropic shape
`{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Anthropic names its error types differently; map ours onto theirs by status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


@dataclass
class GatewayError(Exception):
    message: str
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def openai_body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, object]:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def invalid_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> GatewayError:
    return GatewayError(message, 400, "invalid_request_error", code, param)


# Errors the whole data plane shares.
def missing_key() -> GatewayError:
    return GatewayError(
        "Missing API key: send it as 'Authorization: Bearer sk-gw-…' or in the 'x-api-key' header.",
        401,
        "invalid_request_error",
        "missing_api_key",
    )


def invalid_key(reason: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(reason, 401, "invalid_request_error", "invalid_api_key")


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        f"Request body is larger than the {limit}-byte limit; send a smaller request.",
        413,
        "invalid_request_error",
        "request_too_large",
    )
