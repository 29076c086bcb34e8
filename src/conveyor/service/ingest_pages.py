"""The ingestion service's dashboard pages: ``/dashboard/ingestion`` (the sources, each with its
latest run) and ``/dashboard/ingestion/{id}`` (the source as the API shows it, header values
never; its latest runs with their pages and rows; the first rows of its table; run now, a
confirmed, CSRF-checked form)."""

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse

from ..dashboard.sections import Kit, Section
from .ingest import Ingestion

TEMPLATES = Path(__file__).parent / "templates"
RUNS_SHOWN = 20
ROWS_SHOWN = 20


def ingest_section(service: Ingestion) -> Section:
    return Section(
        slug="ingestion",
        title="Ingestion",
        templates=TEMPLATES,
        routes=lambda kit: _routes(service, kit),
    )


def _routes(service: Ingestion, kit: Kit) -> APIRouter:
    router = APIRouter()
    Owner = Annotated[str | None, Depends(kit.tenant)]

    @router.get("")
    async def sources(request: Request, owner: Owner) -> Response:
        found = await service.list_sources(owner=owner)
        latest = await service.latest_runs([source["id"] for source in found], owner=owner)
        return kit.render(
            request, "sources.html", sources=[(s, latest.get(s["id"])) for s in found]
        )

    @router.get("/{source_id}")
    async def source(request: Request, source_id: str, owner: Owner) -> Response:
        shown = await service.get(source_id, owner=owner)
        runs = await service.runs(shown["id"], owner=owner, limit=RUNS_SHOWN)
        rows, more = await service.rows(shown["id"], owner=owner, after=0, limit=ROWS_SHOWN)
        settings = {k: v for k, v in shown.items() if k not in ("id", "name", "links")}
        return kit.render(
            request, "source.html", source=shown, settings=settings, runs=runs, rows=rows, more=more
        )

    @router.post("/{source_id}/run", dependencies=[Depends(kit.csrf_checked)])
    async def run(request: Request, source_id: str, owner: Owner) -> Response:
        task = await service.start_run(source_id, owner=owner)
        return RedirectResponse(f"{kit.base(request)}/tasks/{task.id}", 303)

    return router
