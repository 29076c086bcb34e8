"""The ``/batches`` API: many tasks of one type submitted in one request, followed as one.

Each route sees only the caller's batches (another tenant's id answers ``404``, as tasks do).
A batch's body may be larger than other requests' (``CONVEYOR_MAX_BATCH_BYTES``), and holds at
most ``CONVEYOR_MAX_BATCH_ITEMS`` items.
"""

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from ..batch_record import BatchRecord
from ..errors import ConveyorError, InvalidArguments
from ..status import TaskStatus
from ..task import UNSET
from .auth import tenant_resolver
from .errors import documented
from .routing import Base, strict_route_class
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


class BatchCreate(SubmitOptions):
    """Body of ``POST /batches``: one task of type ``name`` per item of ``items``."""

    name: str = Field(min_length=1, max_length=200, description="A registered task type.")
    items: list[dict[str, Any]] = Field(description="Each item: the arguments of one task.")


class BatchCounts(BaseModel):
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int


class BatchOut(BaseModel):
    """A batch as the API shows it."""

    id: str
    name: str
    status: Literal["active", "finished"]
    total: int
    counts: BatchCounts
    progress: float
    created_at: str
    finished_at: str | None
    links: dict[str, str]


class BatchPage(BaseModel):
    items: list[BatchOut]
    next_cursor: str | None


class ItemPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


BatchId = Annotated[UUID, Path(description="The batch's id (a UUID).")]
Cursor = Annotated[str | None, Query(max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?$")]


def build_batch_router(yard: "Conveyor", *, body_schema: dict[str, Any] | None = None) -> APIRouter:
    """The ``/batches`` routes over ``yard`` (included by ``yard.router()``)."""
    batches = yard.batches
    settings = yard.settings
    tenant = tenant_resolver(settings)
    Tenant = Annotated[str, Depends(tenant)]
    router = APIRouter(route_class=strict_route_class(settings.max_batch_bytes))

    async def visible_batch(batch_id: BatchId, owner: Tenant) -> BatchRecord:
        return await batches.get(str(batch_id), owner=owner)

    def out(batch: BatchRecord, base: str, status_code: int = 200) -> Response:
        return json_response(batch.to_json(base), status_code)

    @router.post(
        "/batches",
        status_code=202,
        summary="Submit many tasks of one type as one batch (one transaction)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": body_schema or BatchCreate.model_json_schema()}
                },
            },
            "parameters": [IDEMPOTENCY_HEADER],
        },
        responses={
            202: {"model": BatchOut, "description": "Committed; `Location` names the batch."},
            200: {"model": BatchOut, "description": "The batch already submitted with this key."},
            **documented(413, 422, 429),
        },
        response_class=Response,
    )
    async def create(request: Request, owner: Tenant, base: Base) -> Response:
        key = idempotency_key(request)
        body = parse_body(await request.body(), BatchCreate)
        if len(body.items) > settings.max_batch_items:
            raise InvalidArguments(
                f"a batch holds at most {settings.max_batch_items} items",
                details=[
                    {
                        "loc": ["body", "items"],
                        "msg": f"{len(body.items)} items; at most {settings.max_batch_items}",
                        "type": "too_long",
                    }
                ],
            )
        options: dict[str, Any] = {
            "owner": owner,
            "priority": body.priority,
            "delay_s": body.delay_s,
            "timeout_s": body.timeout_s if "timeout_s" in body.model_fields_set else UNSET,
            "public_only": True,
        }
        if key is None:
            batch, created = await batches.submit(body.name, body.items, **options), True
        else:
            batch, created = await batches.submit_once(key, body.name, body.items, **options)
        response = out(batch, base, 202 if created else 200)
        response.headers["Location"] = f"{base}/batches/{batch.id}"
        return response

    @router.get(
        "/batches",
        summary="Batches, newest first",
        response_model=BatchPage,
        responses=documented(422),
        response_class=Response,
    )
    async def list_batches(
        owner: Tenant,
        base: Base,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Cursor = None,
    ) -> Response:
        before = float(cursor) if cursor is not None else None
        found = await batches.list_batches(owner=owner, limit=limit + 1, before=before)
        page = found[:limit]
        next_cursor = repr(page[-1].created_at) if len(found) > limit else None
        return json_response({"items": [b.to_json(base) for b in page], "next_cursor": next_cursor})

    @router.get(
        "/batches/{batch_id}",
        summary="A batch: counts by status, progress, times",
        response_model=BatchOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def get(batch_id: BatchId, owner: Tenant, base: Base) -> Response:
        return out(await batches.get(str(batch_id), owner=owner), base)

    @router.get(
        "/batches/{batch_id}/items",
        summary="The batch's tasks in submission order, optionally of one status",
        response_model=ItemPage,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def items(
        batch_id: BatchId,
        owner: Tenant,
        base: Base,
        status: TaskStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(max_length=18, pattern=r"^[0-9]{1,18}$")] = None,
    ) -> Response:
        found = await batches.items(
            str(batch_id),
            owner=owner,
            status=status,
            after_seq=int(cursor) if cursor is not None else None,
            limit=limit + 1,
        )
        page = found[:limit]
        next_cursor = str(page[-1].seq) if len(found) > limit else None
        return json_response({"items": [r.to_json(base) for r in page], "next_cursor": next_cursor})

    @router.get(
        "/batches/{batch_id}/events",
        summary="Stream the batch's counts (Server-Sent Events, coalesced) until it finishes",
        response_class=EventSourceResponse,
        responses=documented(404, 422),
    )
    async def events(
        batch: Annotated[BatchRecord, Depends(visible_batch)], owner: Tenant, base: Base
    ) -> AsyncIterator[ServerSentEvent]:
        try:
            async for current in batches.watch(batch.id, owner=owner):
                yield ServerSentEvent(event="counts", data=current.to_json(base))
        except ConveyorError as exc:
            yield ServerSentEvent(event="error", data={"detail": exc.message})

    @router.post(
        "/batches/{batch_id}/cancel",
        summary="Cancel the queued items; ask the running ones to stop",
        response_model=BatchOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def cancel(batch_id: BatchId, owner: Tenant, base: Base) -> Response:
        return out(await batches.cancel(str(batch_id), owner=owner), base)

    @router.post(
        "/batches/{batch_id}/retry",
        status_code=202,
        summary="Re-run the items of the given statuses (failed by default)",
        responses={202: {"model": BatchOut}, **documented(404, 422)},
        response_class=Response,
    )
    async def retry(
        batch_id: BatchId,
        owner: Tenant,
        base: Base,
        status: Annotated[
            str,
            Query(
                max_length=40,
                pattern=r"^(failed|cancelled)(,(failed|cancelled))?$",
                description="failed, cancelled, or both (comma-separated)",
            ),
        ] = "failed",
    ) -> Response:
        statuses = {TaskStatus(part) for part in status.split(",")}
        batch = await batches.retry(str(batch_id), owner=owner, statuses=statuses)
        return out(batch, base, 202)

    return router
