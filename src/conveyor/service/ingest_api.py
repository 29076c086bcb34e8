"""The ingestion service's routes (``/ingest/sources``) over :class:`~.ingest.Ingestion`."""

from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict

from ..api.auth import tenant_resolver
from ..api.errors import documented
from ..api.routing import Base, strict_route_class
from ..api.shapes import TaskOut, json_response, parse_body
from .ingest import MAX_RUNS_KEPT, Ingestion
from .ingest_models import SourceIn

if TYPE_CHECKING:
    from ..core import Conveyor


class SourceOut(BaseModel):
    id: str
    name: str
    url: str
    headers: list[str]
    params: dict[str, str]
    records_path: str | None
    primary_key: list[str]
    pagination: dict[str, Any]
    cursor: dict[str, Any] | None
    every_s: float | None
    cron: str | None
    timezone: str
    max_pages: int
    max_response_bytes: int
    timeout_s: float
    rate_per_s: float | None
    table: str
    columns: dict[str, str] | None
    schedule_id: str | None
    created_at: float
    links: dict[str, str]


class SourceChange(BaseModel):
    """Body of ``PATCH /ingest/sources/{id}``: the fields to change, checked with the rest of
    the source as in ``POST`` (``headers`` replace the source's headers whole)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    headers: dict[str, str] | None = None
    params: dict[str, str] | None = None
    records_path: str | None = None
    pagination: dict[str, Any] | None = None
    cursor: dict[str, Any] | None = None
    every_s: float | None = None
    cron: str | None = None
    timezone: str | None = None
    max_pages: int | None = None
    max_response_bytes: int | None = None
    timeout_s: float | None = None
    rate_per_s: float | None = None


class SourcePage(BaseModel):
    items: list[SourceOut]


class RunPage(BaseModel):
    items: list[TaskOut]


class RowPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None


SourceId = Annotated[UUID, Path(description="The source's id (a UUID).")]


def based(source: dict[str, Any], base: str) -> dict[str, Any]:
    """A source's JSON with its links under ``base``, where the API is served."""
    return {**source, "links": {name: base + link for name, link in source["links"].items()}}


def build_ingest_router(yard: "Conveyor", service: Ingestion) -> APIRouter:
    tenant = tenant_resolver(yard.settings)
    Tenant = Annotated[str, Depends(tenant)]
    router = APIRouter(
        prefix="/ingest",
        tags=["ingestion"],
        route_class=strict_route_class(yard.settings.max_body_bytes),
    )

    @router.post(
        "/sources",
        status_code=201,
        summary="Add a source (and its schedule, with every_s or cron)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SourceIn.model_json_schema()}},
            }
        },
        responses={201: {"model": SourceOut}, **documented(409, 422)},
        response_class=Response,
    )
    async def create(request: Request, owner: Tenant, base: Base) -> Response:
        spec = parse_body(await request.body(), SourceIn)
        source = based(await service.create(spec, owner=owner), base)
        return json_response(source, 201, {"Location": source["links"]["self"]})

    @router.get("/sources", response_model=SourcePage, response_class=Response)
    async def list_sources(owner: Tenant, base: Base) -> Response:
        found = await service.list_sources(owner=owner)
        return json_response({"items": [based(source, base) for source in found]})

    @router.get(
        "/sources/{source_id}",
        response_model=SourceOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def get(source_id: SourceId, owner: Tenant, base: Base) -> Response:
        return json_response(based(await service.get(str(source_id), owner=owner), base))

    @router.patch(
        "/sources/{source_id}",
        summary="Change a source (its name, table and primary key stay)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SourceChange.model_json_schema()}},
            }
        },
        response_model=SourceOut,
        responses=documented(404, 409, 422),
        response_class=Response,
    )
    async def change(source_id: SourceId, request: Request, owner: Tenant, base: Base) -> Response:
        changes = parse_body(await request.body(), SourceChange).model_dump(exclude_unset=True)
        return json_response(
            based(await service.update(str(source_id), changes, owner=owner), base)
        )

    @router.delete(
        "/sources/{source_id}",
        status_code=204,
        summary="Forget a source, its schedule, its table and its cursor",
        responses=documented(404, 422),
        response_class=Response,
    )
    async def delete(source_id: SourceId, owner: Tenant) -> Response:
        await service.delete(str(source_id), owner=owner)
        return Response(status_code=204)

    @router.post(
        "/sources/{source_id}/run",
        status_code=202,
        summary="Run the source now: 202 + the task",
        responses={202: {"model": TaskOut}, **documented(404, 422, 429)},
        response_class=Response,
    )
    async def run(source_id: SourceId, owner: Tenant, base: Base) -> Response:
        record = await service.start_run(str(source_id), owner=owner)
        return json_response(record.to_json(base), 202, {"Location": f"{base}/tasks/{record.id}"})

    @router.get(
        "/sources/{source_id}/runs",
        summary=f"The source's latest runs (at most {MAX_RUNS_KEPT}), newest first",
        response_model=RunPage,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def runs(
        source_id: SourceId,
        owner: Tenant,
        base: Base,
        limit: Annotated[int, Query(ge=1, le=MAX_RUNS_KEPT)] = 20,
    ) -> Response:
        found = await service.runs(str(source_id), owner=owner, limit=limit)
        return json_response({"items": [task.to_json(base) for task in found]})

    @router.get(
        "/sources/{source_id}/rows",
        summary="The source's table, in the order rows were first stored",
        response_model=RowPage,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def rows(
        source_id: SourceId,
        owner: Tenant,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(max_length=18, pattern=r"^[0-9]+$")] = None,
    ) -> Response:
        items, next_cursor = await service.rows(
            str(source_id), owner=owner, after=int(cursor or 0), limit=limit
        )
        return json_response({"items": items, "next_cursor": next_cursor})

    return router


__all__ = ["build_ingest_router"]
