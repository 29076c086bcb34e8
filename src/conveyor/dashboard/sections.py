"""Pages a ready service adds to the dashboard (the emails, the ingestion sources).

A service registers a :class:`Section` on its Conveyor (``yard.dashboard_sections``) before the
dashboard is built; the dashboard then lists it in its navigation, loads its templates (which
extend ``base.html``) and mounts its routes under ``/{slug}``. The routes get a :class:`Kit`:
the dashboard's own rendering, its tenant (the same key session or ``auth`` dependency as every
page), its CSRF check for forms, and the page size, so a section's pages look, authenticate and
refuse like the rest: a ``ConveyorError`` a route lets through is answered with its status and
message by the dashboard's handler.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response


@dataclass(frozen=True)
class Kit:
    """What a section's routes use from the dashboard."""

    #: ``render(request, template, status_code=200, **values)``: a page, with the navigation
    render: Callable[..., Response]
    #: a FastAPI dependency: the tenant whose items are shown (None: every tenant's)
    tenant: Callable[..., Awaitable[str | None]]
    #: a FastAPI dependency of every form's POST: refuses a missing or wrong CSRF token (403)
    csrf_checked: Callable[..., Awaitable[None]]
    #: where the dashboard is mounted, for links and redirects (``/dashboard``)
    base: Callable[[Request], str]
    page: int


@dataclass(frozen=True)
class Section:
    """A service's pages: ``/{slug}`` and below, ``title`` in the navigation."""

    slug: str
    title: str
    templates: Path
    routes: Callable[[Kit], APIRouter]

    def link(self) -> dict[str, Any]:
        return {"slug": self.slug, "title": self.title}
