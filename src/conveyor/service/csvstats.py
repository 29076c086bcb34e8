"""The CSV statistics service: the internal ``csv.stats`` task type and ``POST /csv-stats``."""

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field

from ..api.auth import tenant_resolver
from ..api.errors import documented
from ..api.router import TaskId, TaskOut, json_response, located_in_body, require_result
from ..api.routing import links_base, raw_endpoint, strict_route_class
from ..api.uploads import read_body_to_file, read_multipart
from ..context import TaskContext
from ..errors import (
    ConveyorError,
    InvalidArguments,
    TaskNotFound,
    UnsupportedMediaType,
)
from ..ids import uuid7
from ..jobs.csvstats import CsvOptions, check_readable, csv_statistics, statistics_csv
from ..task import validated

if TYPE_CHECKING:
    from ..core import Conveyor

RAW_TYPES = (
    "text/csv",
    "text/plain",
    "application/gzip",
    "application/x-gzip",
    "application/octet-stream",
)


def csv_stats_task(
    ctx: TaskContext,
    source: str,
    options: CsvOptions,
    memory_limit: Annotated[str, Field(pattern=r"^[0-9]+(KB|MB|GB)$")] = "256MB",
) -> dict[str, Any]:
    """Statistics of the uploaded CSV blob ``source`` (progress follows the bytes read)."""
    if not source.startswith(f"{ctx.task_id}/"):
        raise InvalidArguments(f"blob {source!r} does not belong to task {ctx.task_id}")
    return csv_statistics(
        ctx.blob_path(source), options, memory_limit=memory_limit, on_progress=ctx.progress
    )


def register_csv_tasks(yard: "Conveyor") -> None:
    """Register ``csv.stats`` (internal: submitted by ``POST /csv-stats``)."""
    yard.task(name="csv.stats", executor="process", timeout_s=3600, public=False)(csv_stats_task)


def _options(values: dict[str, str]) -> CsvOptions:
    raw: dict[str, Any] = {}
    for key in ("delimiter", "encoding"):
        if values.get(key):
            raw[key] = values[key] if key == "delimiter" else values[key].lower()
    if values.get("header"):
        raw["header"] = values["header"]
    if values.get("columns"):
        raw["columns"] = [name.strip() for name in values["columns"].split(",") if name.strip()]
    return validated(CsvOptions, raw, location=("query",), message="invalid CSV options")


def build_csv_router(yard: "Conveyor") -> APIRouter:
    """``POST /csv-stats``: a CSV file (multipart ``file``, or the raw body; gzip accepted)."""
    settings = yard.settings
    router = APIRouter(route_class=strict_route_class(settings.max_body_bytes), tags=["csv"])
    tenant = tenant_resolver(settings)
    parameters = [
        {"name": "delimiter", "in": "query", "schema": {"type": "string", "maxLength": 1}},
        {"name": "header", "in": "query", "schema": {"type": "boolean", "default": True}},
        {
            "name": "encoding",
            "in": "query",
            "schema": {"type": "string", "enum": ["utf-8", "utf-16", "latin-1"]},
        },
        {
            "name": "columns",
            "in": "query",
            "schema": {"type": "string"},
            "description": "Comma-separated column names (default: all).",
        },
    ]
    body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "text/csv": {"schema": {"type": "string"}},
            "application/gzip": {"schema": {"type": "string", "format": "binary"}},
        },
    }

    @router.post(
        "/csv-stats",
        status_code=202,
        summary="Per-column statistics of a CSV file",
        openapi_extra={"requestBody": body, "parameters": parameters},
        responses={202: {"model": TaskOut}, **documented(413, 415, 422, 429, 507)},
        response_class=Response,
    )
    @raw_endpoint
    async def submit_csv(request: Request) -> Response:
        owner = await tenant(request)
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        staging = yard.blobs.root / ".uploads"
        if media == "multipart/form-data":
            form = await read_multipart(
                request, staging_root=staging, max_bytes=settings.max_upload_bytes, max_files=1
            )
        elif media in RAW_TYPES:
            form = await read_body_to_file(
                request, staging_root=staging, max_bytes=settings.max_upload_bytes, name="data.csv"
            )
        else:
            raise UnsupportedMediaType(
                f"POST /csv-stats takes multipart/form-data or text/csv, not {media or 'nothing'}"
            )
        task_id = uuid7()
        try:
            uploads = form.require_files("file")
            options = _options({**dict(request.query_params), **form.fields})
            blob_id, path = yard.blobs.adopt(task_id, "source.csv", uploads[0].path)
            await asyncio.to_thread(check_readable, path)
            record, _ = await yard.submit(
                "csv.stats",
                {
                    "source": blob_id,
                    "options": options.model_dump(mode="json"),
                    "memory_limit": settings.csv_memory_limit,
                },
                owner=owner,
                task_id=task_id,
            )
        except BaseException as exc:
            await asyncio.to_thread(yard.blobs.delete_task, task_id)
            if isinstance(exc, ConveyorError):
                raise located_in_body(exc) from None
            raise
        finally:
            form.discard()
        base = links_base(request)
        return json_response(record.to_json(base), 202, {"Location": f"{base}/tasks/{record.id}"})

    @router.get(
        "/csv-stats/{task_id}/statistics.csv",
        summary="The statistics of a finished CSV task, as CSV (formula-like cells neutralised)",
        responses={
            200: {"description": "A row per column of the file", "content": {"text/csv": {}}},
            **documented(404, 409, 422),
        },
        response_class=Response,
    )
    async def export_csv(task_id: TaskId, owner: Annotated[str, Depends(tenant)]) -> Response:
        record = await yard.get(str(task_id), owner=owner)
        if record.name != "csv.stats":
            raise TaskNotFound(f"task {record.id} is not a CSV statistics task")
        return Response(
            statistics_csv(require_result(record).result),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="statistics-{record.id}.csv"',
                "X-Content-Type-Options": "nosniff",
            },
        )

    return router
