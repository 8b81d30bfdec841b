"""API pieces every app's management router shares: paging, the error schema, the admin token."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from django.conf import settings
from django.http import HttpRequest
from ninja import Field, Schema
from ninja.security import HttpBearer

from core.errors import GatewayError

T = TypeVar("T")


class Page(Schema, Generic[T]):
    items: list[T]
    count: int
    limit: int
    offset: int


class PageParams(Schema):
    limit: int = Field(100, ge=1, le=500)
    offset: int = Field(0, ge=0, le=1_000_000_000)

    def of(self, queryset: Any, shape: Callable[[Any], T]) -> dict[str, Any]:
        """One page of a queryset: only `limit` rows are fetched, plus a count."""
        rows = queryset[self.offset : self.offset + self.limit]
        return {
            "items": [shape(row) for row in rows],
            "count": queryset.count(),
            "limit": self.limit,
            "offset": self.offset,
        }


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorOut(Schema):
    error: ErrorDetail


# Recorded in the audit log for changes made through the management API (every router
# guarded by AdminToken): the token names no person, so the API is the actor.
ADMIN_ACTOR = "admin-api"


class AdminToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> str | None:
        expected = settings.GATEWAY_ADMIN_TOKEN
        if not expected:
            raise GatewayError(
                "The management API is disabled: set GATEWAY_ADMIN_TOKEN to enable it.",
                403,
                "permission_error",
                "admin_api_disabled",
            )
        if hmac.compare_digest(token.encode(), expected.encode()):
            return "admin"
        return None
