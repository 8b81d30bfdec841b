"""Encryption at rest for provider credentials, and hashing of virtual-key secrets."""

from __future__ import annotations

import base64
import hashlib
import secrets
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@cache
def _fernet() -> MultiFernet:
    keys = list(settings.GATEWAY_ENCRYPTION_KEYS)
    if not keys:
        # Derived so that the embedded default needs no extra setting; production
        # should set GATEWAY_ENCRYPTION_KEY so SECRET_KEY can rotate independently.
        digest = hashlib.sha256(f"gateway-credentials:{settings.SECRET_KEY}".encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except ValueError:
        raise ImproperlyConfigured(
            "GATEWAY_ENCRYPTION_KEY must be Fernet keys (32 url-safe base64 bytes), "
            "comma-separated; make one with: python -c "
            '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
        ) from None


def encrypt_secret(plaintext: str) -> str:
    if not plaintext:
        return ""
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt_secret(token: str) -> str:
    if not token:
        return ""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ImproperlyConfigured(
            "A stored provider credential cannot be decrypted: GATEWAY_ENCRYPTION_KEY "
            "(or SECRET_KEY, when no encryption key is set) changed since it was saved."
        ) from None


def new_key_secret() -> str:
    # 32 random bytes, url-safe: 43 characters after the recognisable prefix.
    return settings.GATEWAY_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
