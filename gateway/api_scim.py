"""The SCIM 2.0 endpoint, /scim/v2/, behind `Authorization: Bearer $GATEWAY_SCIM_TOKEN`.

A thin edge: parse the JSON, call accounts.scim, answer application/scim+json. SCIM
has its own error shape (RFC 7644 §3.12), so these are plain views, not ninja's.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from accounts import scim
from accounts.scim import ScimError
from core.http import json_response

CONTENT_TYPE = "application/scim+json"
View = Callable[..., HttpResponse]


def _json(body: Any, status: int = 200) -> HttpResponse:
    return json_response(body, status, content_type=CONTENT_TYPE)


def _listing(request: HttpRequest, rows: Any, filters: Any, shape: Any) -> HttpResponse:
    """One page of a resource list, filtered as the client asked (`filter`, `startIndex`)."""
    q = scim.parse_filter(request.GET.get("filter"), filters)
    if q is not None:
        rows = rows.filter(q)
    return _json(scim.page(rows.order_by("id"), request.GET, shape, _base_url(request)))


def _base_url(request: HttpRequest) -> str:
    return request.build_absolute_uri("/scim/v2").rstrip("/")


def _body(request: HttpRequest) -> dict[str, Any]:
    try:
        data = json.loads(request.body or b"{}")
    except ValueError:
        raise ScimError(400, "The body is not JSON.", "invalidSyntax") from None
    if not isinstance(data, dict):
        raise ScimError(400, "The body must be a JSON object.", "invalidSyntax")
    return data


def scim_view(methods: tuple[str, ...]) -> Callable[[View], View]:
    """Bearer token, allowed methods and SCIM errors for one endpoint."""

    def wrap(view: View) -> View:
        @csrf_exempt
        def handler(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            token = settings.GATEWAY_SCIM_TOKEN
            if not token:
                return _json(ScimError(404, "SCIM is off: set GATEWAY_SCIM_TOKEN.").to_dict(), 404)
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), token.encode()
            ):
                response = _json(ScimError(401, "A valid bearer token is required.").to_dict(), 401)
                response["WWW-Authenticate"] = 'Bearer realm="scim"'
                return response
            if request.method not in methods:
                error = ScimError(405, f"{request.method} is not allowed here.")
                return _json(error.to_dict(), 405)
            try:
                return view(request, *args, **kwargs)
            except ScimError as exc:
                return _json(exc.to_dict(), exc.status)

        return handler

    return wrap


@scim_view(("GET", "POST"))
def users(request: HttpRequest) -> HttpResponse:
    base = _base_url(request)
    if request.method == "POST":
        user = scim.scim_user_create(data=_body(request))
        return _json(scim.user_to_scim(user, base), 201)
    return _listing(request, scim.scim_users(), scim.USER_FILTERS, scim.user_to_scim)


@scim_view(("GET", "PUT", "PATCH", "DELETE"))
def user(request: HttpRequest, scim_id: str) -> HttpResponse:
    base = _base_url(request)
    found = scim.scim_user_get(scim_id=scim_id)
    if request.method == "DELETE":
        scim.scim_user_delete(user=found)
        return HttpResponse(status=204)
    if request.method == "PUT":
        found = scim.scim_user_replace(user=found, data=_body(request))
    elif request.method == "PATCH":
        found = scim.scim_user_patch(user=found, body=_body(request))
    return _json(scim.user_to_scim(found, base))


@scim_view(("GET", "POST"))
def groups(request: HttpRequest) -> HttpResponse:
    base = _base_url(request)
    if request.method == "POST":
        group = scim.scim_group_create(data=_body(request))
        return _json(scim.group_to_scim(group, base), 201)
    return _listing(request, scim.scim_groups(), scim.GROUP_FILTERS, scim.group_to_scim)


@scim_view(("GET", "PUT", "PATCH", "DELETE"))
def group(request: HttpRequest, scim_id: str) -> HttpResponse:
    base = _base_url(request)
    found = scim.scim_group_get(scim_id=scim_id)
    if request.method == "DELETE":
        scim.scim_group_delete(group=found)
        return HttpResponse(status=204)
    if request.method == "PUT":
        found = scim.scim_group_replace(group=found, data=_body(request))
    elif request.method == "PATCH":
        found = scim.scim_group_patch(group=found, body=_body(request))
    return _json(scim.group_to_scim(found, base))


@scim_view(("GET",))
def service_provider_config(request: HttpRequest) -> HttpResponse:
    return _json(scim.service_provider_config(_base_url(request)))


@scim_view(("GET",))
def resource_types(request: HttpRequest) -> HttpResponse:
    items = scim.resource_types(_base_url(request))
    return _json(
        {
            "schemas": [scim.LIST_SCHEMA],
            "totalResults": len(items),
            "startIndex": 1,
            "itemsPerPage": len(items),
            "Resources": items,
        }
    )


@scim_view(("GET",))
def schemas(request: HttpRequest) -> HttpResponse:
    items = scim.schemas(_base_url(request))
    return _json(
        {
            "schemas": [scim.LIST_SCHEMA],
            "totalResults": len(items),
            "startIndex": 1,
            "itemsPerPage": len(items),
            "Resources": items,
        }
    )


urlpatterns = [
    path("Users", users),
    path("Users/<str:scim_id>", user),
    path("Groups", groups),
    path("Groups/<str:scim_id>", group),
    path("ServiceProviderConfig", service_provider_config),
    path("ResourceTypes", resource_types),
    path("Schemas", schemas),
]
