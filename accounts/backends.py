"""The password login backend: Django's, switched off by GATEWAY_PASSWORD_LOGIN=false.

With password login off only single sign-on remains, except for superusers: the
break-glass account that still works when the IdP is down or misconfigured.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import User
from django.http import HttpRequest


class PasswordLoginBackend(ModelBackend):
    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None or settings.GATEWAY_PASSWORD_LOGIN:
            return user
        return user if user.is_superuser else None
