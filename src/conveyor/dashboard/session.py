"""The dashboard's session cookie and CSRF tokens: HMAC-SHA256 signatures, no server state.

With API keys set, a visitor gives a key once (``/dashboard/login``); the answer sets a cookie
``<tenant>|<expiry>|<signature>`` (HttpOnly, SameSite=Strict, Secure over HTTPS). Every form
carries a CSRF token, the signature of the session (or of ``anonymous``): a POST without the
token of the visitor's own session is refused. The signing key is ``CONVEYOR_DASHBOARD_SECRET``,
or else derived from the API keys (so every process serving the dashboard agrees), or else a
random key of this process (no keys: nothing to protect but the actions, and forms are rendered
by the same process that checks them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from ..settings import Settings

SESSION_COOKIE = "conveyor_session"
SESSION_S = 12 * 3600


class Signer:
    def __init__(self, settings: Settings) -> None:
        if settings.dashboard_secret is not None:
            key = settings.dashboard_secret.get_secret_value().encode()
        elif settings.api_keys:
            key = hashlib.sha256(b"conveyor-dashboard\0" + settings.api_keys.encode()).digest()
        else:
            key = secrets.token_bytes(32)
        self._key = key

    def _sign(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def session(self, tenant: str) -> str:
        """A cookie value naming ``tenant`` for ``SESSION_S``."""
        encoded = base64.urlsafe_b64encode(tenant.encode()).decode()
        body = f"{encoded}|{int(time.time()) + SESSION_S}"
        return f"{body}|{self._sign(body)}"

    def tenant(self, cookie: str | None) -> str | None:
        """The tenant of a valid, unexpired cookie; None otherwise."""
        if not cookie or cookie.count("|") != 2:
            return None
        encoded, expiry, signature = cookie.split("|")
        if not hmac.compare_digest(signature, self._sign(f"{encoded}|{expiry}")):
            return None
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        try:
            return base64.urlsafe_b64decode(encoded.encode()).decode()
        except ValueError:
            return None

    def csrf(self, cookie: str | None) -> str:
        return self._sign(f"csrf\0{cookie or 'anonymous'}")

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf(cookie))
