"""The ID-token checks fail closed, through the very function the SSO callback uses.

Tokens are signed here with keys this test makes; the client is Authlib's, given the
IdP's metadata (issuer, JWKS) directly instead of from a discovery document.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from authlib.integrations.django_client import OAuth
from joserfc import jwt
from joserfc.jwk import RSAKey

from accounts import sso

ISSUER = "https://idp.example.test"
CLIENT_ID = "gateway"
NONCE = "n-0S6_WzA2Mj"
IDP_KEY = RSAKey.generate_key(2048, parameters={"kid": "idp-1"})
# Another key under the same key id: a forged signature.
FORGER_KEY = RSAKey.generate_key(2048, parameters={"kid": "idp-1"})


@pytest.fixture(autouse=True)
def oidc_settings(settings: Any) -> None:
    settings.GATEWAY_OIDC_ISSUER = ISSUER
    settings.GATEWAY_OIDC_CLIENT_ID = CLIENT_ID
    settings.GATEWAY_OIDC_CLIENT_SECRET = "client-secret"


def client() -> Any:
    return OAuth().register(
        name=f"t{time.monotonic_ns()}",
        client_id=CLIENT_ID,
        client_secret="client-secret",
        issuer=ISSUER,
        jwks={"keys": [IDP_KEY.as_dict(private=False)]},
        id_token_signing_alg_values_supported=["RS256"],
    )


def id_token(key: RSAKey = IDP_KEY, **overrides: Any) -> dict[str, str]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "alice-sub",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 300,
        "nonce": NONCE,
        "email": "alice@example.com",
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    token = jwt.encode({"alg": "RS256", "kid": "idp-1"}, claims, key)
    return {"id_token": token, "access_token": "opaque-access-token", "token_type": "Bearer"}


def test_it_accepts_a_good_token() -> None:
    claims = sso.sso_verify_id_token(client=client(), token=id_token(), nonce=NONCE)
    assert claims["sub"] == "alice-sub"
    assert claims["email"] == "alice@example.com"


@pytest.mark.parametrize(
    "case",
    [
        {"aud": "someone-else"},
        # Authlib alone would take this one: another audience, but azp names us.
        {"aud": "someone-else", "azp": CLIENT_ID},
        {"iss": "https://evil.example.test"},
        {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
        {"exp": None},
        {"nonce": "another-nonce"},
        {"nonce": None},
    ],
    ids=[
        "wrong-audience",
        "wrong-audience-with-azp",
        "wrong-issuer",
        "expired",
        "no-expiry",
        "bad-nonce",
        "no-nonce",
    ],
)
def test_it_refuses_a_bad_claim(case: dict[str, Any]) -> None:
    with pytest.raises(sso.SsoError):
        sso.sso_verify_id_token(client=client(), token=id_token(**case), nonce=NONCE)


def test_it_refuses_a_bad_signature() -> None:
    with pytest.raises(sso.SsoError):
        sso.sso_verify_id_token(client=client(), token=id_token(FORGER_KEY), nonce=NONCE)


def test_it_refuses_an_unsigned_token() -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "x", "aud": CLIENT_ID, "iat": now, "exp": now + 60}
    import base64
    import json

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    unsigned = f"{b64({'alg': 'none'})}.{b64({**claims, 'nonce': NONCE})}."
    with pytest.raises(sso.SsoError):
        sso.sso_verify_id_token(
            client=client(), token={"id_token": unsigned, "access_token": "a"}, nonce=NONCE
        )


def test_it_refuses_a_missing_id_token_or_nonce() -> None:
    with pytest.raises(sso.SsoError):
        sso.sso_verify_id_token(client=client(), token={"access_token": "a"}, nonce=NONCE)
    with pytest.raises(sso.SsoError):
        sso.sso_verify_id_token(client=client(), token=id_token(), nonce="")
