"""The dashboard over real HTTP: a signed-in client and CSRF-carrying posts."""

from __future__ import annotations

import re
from typing import Any

import httpx

_CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


def dashboard_login(base_url: str, username: str, password: str) -> httpx.Client:
    """A cookie-keeping client signed in through the real /login/ form (CSRF included)."""
    client = httpx.Client(base_url=base_url, timeout=30, follow_redirects=False)
    page = client.get("/login/")
    assert page.status_code == 200, page.text[:500]
    match = _CSRF_FIELD.search(page.text)
    assert match, "no CSRF token on the login page"
    response = client.post(
        "/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": match.group(1)},
    )
    assert response.status_code == 302, (response.status_code, response.text[:500])
    assert "sessionid" in client.cookies, "the login set no session cookie"
    return client


def csrf_headers(client: httpx.Client) -> dict[str, str]:
    token = client.cookies.get("csrftoken") or ""
    return {"x-csrftoken": token, "referer": f"{client.base_url}/"}


def dashboard_post(client: httpx.Client, path: str, data: dict[str, Any]) -> httpx.Response:
    token = client.cookies.get("csrftoken") or ""
    return client.post(
        path, data={**data, "csrfmiddlewaretoken": token}, headers=csrf_headers(client)
    )
