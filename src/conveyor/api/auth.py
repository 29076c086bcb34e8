"""Bearer API keys mapped to tenants."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request

from ..settings import Settings


def tenant_resolver(settings: Settings) -> Callable[[Request], Awaitable[str]]:
    """A dependency answering the caller's tenant ("" while authentication is off), or 401."""
    tenants = settings.tenants_by_key()

    async def tenant(request: Request) -> str:
        if not tenants:
            return ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            for key, name in tenants.items():
                if secrets.compare_digest(key.encode(), token.encode()):
                    return name
        raise HTTPException(401, "missing or invalid API key", {"WWW-Authenticate": "Bearer"})

    return tenant
