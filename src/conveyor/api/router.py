"""The ``/tasks`` API of DESIGN.md as a FastAPI router bound to one Conveyor instance."""

import copy
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from ..blobs import safe_filename
from ..errors import ConveyorError, InvalidArguments, TaskStateConflict
from ..record import TaskRecord, iso, moment_of
from ..status import TaskStatus
from ..store.rows import TaskFilter
from ..task import UNSET
from .auth import tenant_resolver
from .batches import BatchCreate, build_batch_router
from .errors import documented, error_response
from .metrics import build_metrics_router
from .routing import Base, links_base, raw_endpoint, strict_route_class
from .schedules import build_schedule_router
from .shapes import (
    IDEMPOTENCY_HEADER,
    SubmitOptions,
    TaskOut,
    idempotency_key,
    json_response,
    parse_body,
)

if TYPE_CHECKING:
    from ..core import Conveyor


class SubmitRequest(SubmitOptions):
    """Body of ``POST /tasks``."""

    name: str = Field(min_length=1, max_length=200, description="A registered task type.")
    args: dict[str, Any] = Field(default_factory=dict, description="The task's arguments.")


class TaskPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class TaskTypeOut(BaseModel):
    name: str
    options: dict[str, Any]
    args_schema: dict[str, Any]


class LogLineOut(BaseModel):
    at: str
    level: str
    message: str
    attempt: int


class LogPage(BaseModel):
    items: list[LogLineOut]
    next_cursor: str | None


class WorkerOut(BaseModel):
    id: str
    host: str
    pid: int
    engine: str
    concurrency: int
    task_types: list[str]
    running: int
    started_at: str
    last_heartbeat_at: str


class WorkerPage(BaseModel):
    items: list[WorkerOut]


TaskId = Annotated[UUID, Path(description="The task's id (a UUID).")]


def require_result(record: TaskRecord) -> TaskRecord:
    """The record if it has a result (completed); ``TaskStateConflict`` (409) saying why not."""
    if record.status is not TaskStatus.COMPLETED:
        reason = f"task {record.id} is {record.status.value}"
        if record.error:
            reason += f": {record.error.get('type')}: {record.error.get('message')}"
        raise TaskStateConflict(reason + "; it has no result")
    return record


def build_router(yard: "Conveyor", *, prefix: str = "") -> APIRouter:
    """The HTTP API over ``yard``; mount it with ``app.include_router(yard.router())``."""
    settings = yard.settings
    tenants = settings.tenants_by_key()
    router = APIRouter(
        prefix=prefix,
        route_class=strict_route_class(settings.max_body_bytes, prefix=prefix),
        responses=documented(401, 503, 507) if tenants else documented(503, 507),
    )

    tenant = tenant_resolver(settings)
    Tenant = Annotated[str, Depends(tenant)]

    async def require_json_body(request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise HTTPException(
                415, f"POST /tasks takes application/json, not {content_type or 'no content type'}"
            )

    submit_body = {
        "required": True,
        "content": {"application/json": {"schema": submit_schema(yard)}},
    }

    # The hot route parses its body itself: strict JSON and one pydantic validation, without
    # FastAPI's per-field body machinery (measured: that machinery halved requests/s).
    @router.post(
        "/tasks",
        status_code=202,
        summary="Submit a task",
        openapi_extra={"requestBody": submit_body, "parameters": [IDEMPOTENCY_HEADER]},
        responses={
            202: {"model": TaskOut, "description": "Committed; `Location` names the task."},
            200: {"model": TaskOut, "description": "The task already submitted with this key."},
            **documented(413, 415, 422, 429),
        },
        response_class=Response,
    )
    @raw_endpoint
    async def submit(request: Request) -> Response:
        owner = await tenant(request)
        await require_json_body(request)
        key = idempotency_key(request)
        body = parse_body(await request.body(), SubmitRequest)
        try:
            record, created = await yard.submit(
                body.name,
                body.args,
                owner=owner,
                priority=body.priority,
                delay_s=body.delay_s,
                timeout_s=body.timeout_s if body.timeout_s is not None else UNSET,
                idempotency_key=key,
                public_only=True,
            )
        except ConveyorError as exc:
            raise located_in_body(exc) from None
        base = links_base(request)
        location = f"{base}/tasks/{record.id}"
        return json_response(record.to_json(base), 202 if created else 200, {"Location": location})

    @router.get(
        "/tasks",
        summary="List tasks, newest first",
        response_model=TaskPage,
        responses=documented(422),
        response_class=Response,
    )
    async def list_tasks(
        owner: Tenant,
        base: Base,
        status: TaskStatus | None = None,
        name: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=18, pattern=r"^[0-9]+$")] = None,
        batch: Annotated[str | None, Query(max_length=64, description="A batch's id")] = None,
        schedule: Annotated[
            str | None, Query(max_length=64, description="A schedule's id: the tasks it made")
        ] = None,
        id_prefix: Annotated[
            str | None,
            Query(
                pattern=r"^[0-9a-f-]{8,36}$",
                description="The first characters of the task's id (at least 8)",
            ),
        ] = None,
        created_after: Annotated[
            str | None,
            Query(
                max_length=40,
                json_schema_extra={"format": "date-time"},
                description="Submitted at or after: ISO 8601 with a time zone",
            ),
        ] = None,
        created_before: Annotated[
            str | None,
            Query(
                max_length=40,
                json_schema_extra={"format": "date-time"},
                description="Submitted before: ISO 8601 with a time zone",
            ),
        ] = None,
    ) -> Response:
        before = int(cursor) if cursor is not None else None
        narrowed = TaskFilter(
            batch_id=batch,
            schedule_id=schedule,
            id_prefix=id_prefix,
            created_after=moment("created_after", created_after),
            created_before=moment("created_before", created_before),
        )
        records = await yard.list(
            owner=owner,
            status=status,
            name=name,
            limit=limit + 1,
            before_seq=before,
            narrowed=narrowed,
        )
        page = records[:limit]
        next_cursor = str(page[-1].seq) if len(records) > limit else None
        return json_response({"items": [r.to_json(base) for r in page], "next_cursor": next_cursor})

    @router.get(
        "/tasks/{task_id}",
        summary="A task's status, progress and result",
        response_model=TaskOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def get_task(task_id: TaskId, owner: Tenant, base: Base) -> Response:
        return json_response((await yard.get(str(task_id), owner=owner)).to_json(base))

    @router.post(
        "/tasks/{task_id}/cancel",
        summary="Cancel a queued or running task",
        response_model=TaskOut,
        responses=documented(404, 409, 422),
        response_class=Response,
    )
    async def cancel_task(task_id: TaskId, owner: Tenant, base: Base) -> Response:
        return json_response((await yard.cancel(str(task_id), owner=owner)).to_json(base))

    @router.post(
        "/tasks/{task_id}/retry",
        status_code=202,
        summary="Re-run a failed or cancelled task",
        responses={202: {"model": TaskOut}, **documented(404, 409, 422)},
        response_class=Response,
    )
    async def retry_task(task_id: TaskId, owner: Tenant, base: Base) -> Response:
        return json_response((await yard.retry(str(task_id), owner=owner)).to_json(base), 202)

    @router.get(
        "/tasks/{task_id}/result",
        summary="The task's result",
        responses={
            200: {
                "description": "The result: JSON, or the file a task produced, with its own "
                "content type (an image, a zip, a CSV, …)",
                "content": {
                    "application/json": {},
                    "*/*": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **documented(404, 409, 422),
        },
        response_class=Response,
    )
    async def get_result(task_id: TaskId, owner: Tenant) -> Response:
        record = require_result(await yard.get(str(task_id), owner=owner))
        if record.result_blob is not None:
            blob = record.result_blob
            return FileResponse(
                yard.blobs.path(blob["id"]),
                media_type=blob["content_type"],
                filename=safe_filename(blob["filename"]),
            )
        return json_response(record.result)

    @router.delete(
        "/tasks/{task_id}",
        status_code=204,
        summary="Forget a terminal task",
        responses=documented(404, 409, 422),
        response_class=Response,
    )
    async def delete_task(task_id: TaskId, owner: Tenant) -> Response:
        await yard.delete(str(task_id), owner=owner)
        return Response(status_code=204)

    async def visible_task(task_id: TaskId, owner: Tenant) -> TaskRecord:
        return await yard.get(str(task_id), owner=owner)

    @router.get(
        "/tasks/{task_id}/logs",
        summary="The task's own log lines (every attempt), oldest first",
        response_model=LogPage,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def task_logs(
        record: Annotated[TaskRecord, Depends(visible_task)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
        cursor: Annotated[str | None, Query(max_length=18, pattern=r"^[0-9]+$")] = None,
    ) -> Response:
        found = await yard.store.logs().read(
            record.id, after=int(cursor) if cursor else 0, limit=limit
        )
        items = [
            {"at": iso(ln.at), "level": ln.level, "message": ln.message, "attempt": ln.attempt}
            for _, ln in found
        ]
        more = len(found) == limit
        return json_response({"items": items, "next_cursor": str(found[-1][0]) if more else None})

    @router.get(
        "/tasks/{task_id}/events",
        summary="Stream status and progress (Server-Sent Events) until the task ends",
        response_class=EventSourceResponse,
        responses=documented(404, 422),
    )
    async def task_events(
        record: Annotated[TaskRecord, Depends(visible_task)], owner: Tenant, base: Base
    ) -> AsyncIterator[ServerSentEvent]:
        last_status: TaskStatus | None = None
        last_progress: tuple[float, str | None] | None = None
        try:
            async for current in yard.watch(record.id, owner=owner):
                if current.status is not last_status:
                    last_status = current.status
                    yield ServerSentEvent(event="status", data=current.to_json(base))
                progress = (current.progress, current.message)
                if progress != last_progress and not current.terminal:
                    last_progress = progress
                    yield ServerSentEvent(
                        event="progress",
                        data={"id": current.id, "progress": progress[0], "message": progress[1]},
                    )
        except ConveyorError as exc:  # deleted while streaming, or the store went away
            yield ServerSentEvent(event="error", data={"detail": exc.message})

    @router.get(
        "/task-types",
        summary="Registered task types, their argument schema and options",
        response_model=list[TaskTypeOut],
    )
    async def task_types(owner: Tenant) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "options": t.options.as_json(),
                "args_schema": t.argument_schema(),
            }
            for t in yard.task_types.values()
        ]

    @router.get(
        "/health",
        summary="Liveness; with a key (or none configured), readiness and task counts",
        responses=documented(503),
    )
    async def health(request: Request) -> Response:
        owner: str | None = None
        if tenants:  # an anonymous caller learns that the service is up, nothing more
            try:
                owner = await tenant(request)
            except HTTPException:
                return json_response({"status": "ok"})
        try:
            counts = await yard.store.count_by_status(owner=owner)
        except ConveyorError as exc:
            return error_response(exc)
        return json_response(
            {
                "status": "ok",
                "engine": settings.engine,
                "tasks": counts,
                "abandoned_threads": yard.abandoned_threads,
            }
        )

    @router.get(
        "/workers",
        summary="The worker processes alive on this store (a heartbeat within the lease)",
        response_model=WorkerPage,
        responses=documented(503),
        response_class=Response,
    )
    async def workers(owner: Tenant) -> Response:
        alive = await yard.store.workers().alive(lease_s=settings.lease_s)
        return json_response({"items": [worker.to_json() for worker in alive]})

    router.include_router(build_metrics_router(yard))
    router.include_router(build_schedule_router(yard))
    router.include_router(build_batch_router(yard, body_schema=batch_schema(yard)))
    return router


def located_in_body(exc: ConveyorError) -> ConveyorError:
    """Locate argument errors in the request body, as FastAPI's own validation errors are."""
    exc.details = [
        item if item.get("loc", ["body"])[0] == "body" else {**item, "loc": ["body", *item["loc"]]}
        for item in exc.details
    ]
    return exc


def submit_schema(yard: "Conveyor") -> dict[str, Any]:
    """The body of ``POST /tasks`` as JSON Schema: one variant per task type registered so far,
    each with its own ``args`` schema, so clients (and schema-driven tests) see what is valid."""
    base = SubmitRequest.model_json_schema()
    options = {key: base["properties"][key] for key in ("priority", "delay_s", "timeout_s")}
    variants = []
    for task_type in yard.task_types.values():
        if not task_type.options.public:
            continue
        args = inline_refs(task_type.argument_schema())
        variants.append(
            {
                "title": task_type.name,
                "type": "object",
                "properties": {"name": {"const": task_type.name}, "args": args, **options},
                "required": ["name", "args"] if args.get("required") else ["name"],
                "additionalProperties": False,
            }
        )
    return {"title": "SubmitRequest", "oneOf": variants} if variants else base


def batch_schema(yard: "Conveyor") -> dict[str, Any]:
    """The body of ``POST /batches`` as JSON Schema: as :func:`submit_schema`, with ``items``
    (a list of the type's arguments) in place of ``args``."""
    submit = submit_schema(yard)
    variants = []
    for variant in submit.get("oneOf", []):
        properties = dict(variant["properties"])
        items = {
            "type": "array",
            "items": properties.pop("args"),
            "maxItems": yard.settings.max_batch_items,
        }
        variants.append(
            {**variant, "properties": {**properties, "items": items}, "required": ["name", "items"]}
        )
    return {"title": "BatchCreate", "oneOf": variants} if variants else {}


def anonymous_openapi(spec: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """The OpenAPI document as a caller without a key may see it: the routes and their shapes,
    but not the task types (``POST /tasks`` and ``POST /batches`` take their generic bodies)."""
    redacted = copy.deepcopy(spec)
    submit = redacted.get("paths", {}).get(f"{prefix}/tasks", {}).get("post")
    if submit is not None:
        content = submit["requestBody"]["content"]["application/json"]
        content["schema"] = SubmitRequest.model_json_schema()
    batch = redacted.get("paths", {}).get(f"{prefix}/batches", {}).get("post")
    if batch is not None:
        content = batch["requestBody"]["content"]["application/json"]
        content["schema"] = BatchCreate.model_json_schema()
    return redacted


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic schema with its local ``$defs`` references inlined (a cycle becomes ``{}``)."""
    definitions: dict[str, Any] = schema.get("$defs", {})

    def resolve(node: Any, seen: frozenset[str]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name in seen or name not in definitions:
                    return {}
                return resolve(definitions[name], seen | {name})
            return {key: resolve(value, seen) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [resolve(item, seen) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema, frozenset())
    return resolved


__all__ = ["InvalidArguments", "SubmitRequest", "TaskOut", "build_router", "json_response"]


def moment(name: str, text: str | None) -> float | None:
    """An ISO 8601 time with its zone, as epoch seconds (``422`` naming the parameter)."""
    if text is None:
        return None
    try:
        return moment_of(text)
    except ValueError:
        raise InvalidArguments(
            f"{name}: an ISO 8601 time with its time zone, such as 2026-12-06T10:00:00Z",
            details=[
                {"loc": ["query", name], "msg": "not an ISO 8601 time with a zone", "type": "value"}
            ],
        ) from None
