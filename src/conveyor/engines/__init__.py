"""Engines: what runs tasks. ``open_engine`` picks one from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Engine, EngineHost

if TYPE_CHECKING:
    from celery import Celery


def open_engine(
    host: EngineHost, *, run_workers: bool, consume: bool = True, celery: Celery | None = None
) -> Engine | None:
    """The engine named by ``host.settings.engine`` (not yet started).

    Args:
        host: the instance the engine runs tasks for.
        run_workers: this process runs tasks (False: an API process that only submits; the
            local engine then has nothing to do, the Celery one still publishes and sweeps).
        consume: the Celery engine runs an embedded Celery worker; False in a Celery pool
            process, where Celery delivers the messages itself.
        celery: the instance's Celery app (the Celery engine only).
    """
    if host.settings.engine == "celery":
        from .celery import CeleryEngine

        if celery is None:
            raise ValueError("the celery engine needs the instance's Celery app")
        return CeleryEngine(host, celery, execute=run_workers, consume=consume)
    if run_workers:
        from .local import LocalEngine

        return LocalEngine(host)
    return None


__all__ = ["Engine", "EngineHost", "open_engine"]
