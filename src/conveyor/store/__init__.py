"""Stores: where task records live, the single source of truth."""

from __future__ import annotations

from ..errors import ConfigurationError
from ..settings import Settings
from .base import Store


def open_store(settings: Settings) -> Store:
    """The store named by ``settings.database_url`` (not yet opened)."""
    if settings.store_url.startswith("sqlite://"):
        from .sqlite import SQLiteStore

        return SQLiteStore(
            settings.sqlite_path(),
            synchronous=settings.sqlite_synchronous,
            busy_timeout_s=settings.sqlite_busy_timeout_s,
        )
    if settings.store_url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(settings.store_url, pool_size=settings.database_pool_size)
    raise ConfigurationError(
        f"no store for {settings.store_url!r}; use sqlite:///path or postgresql://…"
    )


__all__ = ["Store", "open_store"]
