"""Sign-in pages: the login page (password and "Sign in with SSO"), the OIDC redirect
and callback, and logout (which ends the IdP session too when the IdP offers it).

The protocol and the identity rules are in accounts.sso; these views only move the
browser along and keep the flow's state in the session.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.contrib.auth import login, logout
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from accounts import sso

log = logging.getLogger(__name__)

# The session keys of a sign-in in progress and of an SSO session.
_NEXT = "sso_next"
_ID_TOKEN = "sso_id_token"  # noqa: S105 (a session key, not a secret)
_BACKEND = "accounts.backends.PasswordLoginBackend"


class LoginView(auth_views.LoginView):
    template_name = "dashboard/login.html"
    redirect_authenticated_user = True
    next_page = "/overview/"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        return {
            **super().get_context_data(**kwargs),
            "sso_enabled": sso.sso_enabled(),
            "password_login": settings.GATEWAY_PASSWORD_LOGIN,
        }


def _safe_next(request: HttpRequest, target: str | None) -> str:
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return "/overview/"


def _refused(request: HttpRequest, message: str, status: int = 403) -> HttpResponse:
    return render(
        request,
        "dashboard/login.html",
        {
            "sso_error": message,
            "sso_enabled": sso.sso_enabled(),
            "password_login": settings.GATEWAY_PASSWORD_LOGIN,
            "form": None,
        },
        status=status,
    )


@require_GET
def sso_start(request: HttpRequest) -> HttpResponse:
    if not sso.sso_enabled():
        return _refused(request, "Single sign-on is not configured.", 404)
    try:
        client = sso.oidc_client()
        request.session[_NEXT] = _safe_next(request, request.GET.get("next"))
        redirect_uri = request.build_absolute_uri(reverse("dashboard:sso-callback"))
        response: HttpResponse = client.authorize_redirect(request, redirect_uri)
    except sso.SsoError as exc:
        return _refused(request, str(exc), 502)
    except Exception:  # the IdP is unreachable or its discovery document is broken
        log.exception("sso: cannot start a sign-in")
        return _refused(request, "The identity provider cannot be reached; try again.", 502)
    return response


@require_GET
def sso_callback(request: HttpRequest) -> HttpResponse:
    if not sso.sso_enabled():
        return _refused(request, "Single sign-on is not configured.", 404)
    if request.GET.get("error"):
        return _refused(
            request,
            f"The identity provider refused the sign-in: {request.GET.get('error')}.",
        )
    state = request.GET.get("state") or ""
    code = request.GET.get("code") or ""
    try:
        client = sso.oidc_client()
        framework = client.framework
        flow = framework.get_state_data(request.session, state) if state else None
        if state:
            framework.clear_state_data(request.session, state)
        if not flow or not code:
            # Not a sign-in this browser started (or it was already used): CSRF on login.
            raise sso.SsoError("This sign-in was not started here or has expired; start again.")
        token = client.fetch_access_token(
            code=code,
            redirect_uri=flow.get("redirect_uri"),
            code_verifier=flow.get("code_verifier"),
        )
        claims = sso.sso_verify_id_token(client=client, token=token, nonce=flow.get("nonce", ""))
        userinfo: dict[str, Any] = {}
        metadata = client.load_server_metadata()
        if metadata.get("userinfo_endpoint") and token.get("access_token"):
            try:
                userinfo = dict(client.userinfo(token=token))
            except Exception:  # userinfo only completes the profile; the ID token decides
                log.warning("sso: userinfo failed", exc_info=True)
            if userinfo.get("sub") not in (None, claims["sub"]):
                userinfo = {}  # OIDC Core 5.3.2: another subject's answer is ignored
        user = sso.sso_login(profile=sso.sso_profile(claims=claims, userinfo=userinfo))
    except sso.SsoError as exc:
        return _refused(request, str(exc))
    except Exception:
        log.exception("sso: sign-in failed")
        return _refused(request, "Single sign-on failed; try again.", 502)
    target = request.session.get(_NEXT) or "/overview/"
    login(request, user, backend=_BACKEND)
    # After login(): the session was cycled, these go into the new one.
    request.session[_ID_TOKEN] = token.get("id_token")
    return HttpResponseRedirect(_safe_next(request, target))


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    id_token = request.session.get(_ID_TOKEN)
    logout(request)
    if id_token and sso.sso_enabled():
        try:
            metadata = sso.oidc_client().load_server_metadata()
        except Exception:
            metadata = {}
        end_session = metadata.get("end_session_endpoint")
        if end_session:
            # RP-Initiated Logout 1.0: the IdP ends its session and sends the browser back.
            result = sso.oidc_client().create_logout_url(
                post_logout_redirect_uri=request.build_absolute_uri(reverse("dashboard:login")),
                id_token_hint=id_token,
            )
            return HttpResponseRedirect(result["url"])
    return redirect("dashboard:login")
