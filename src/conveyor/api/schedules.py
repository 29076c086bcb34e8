"""The ``/schedules`` API: periodic schedules made, changed, paused and fired over HTTP.

Each route sees only the caller's schedules (another tenant's id answers ``404``, as tasks do).
Schedules declared in code belong to no tenant: with API keys set they are managed in code
only, and a tenant's list does not show them.
"""

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from ..cron import describe
from ..errors import InvalidArguments
from ..scheduler import upcoming
from ..serialization import NumberOnly
from .auth import tenant_resolver
from .errors import documented
from .routing import Base, strict_route_class
from .shapes import TaskOut, json_response, parse_body

if TYPE_CHECKING:
    from ..core import Conveyor

NULLABLE = frozenset({"cron", "every_s", "start_at", "end_at"})


def _not_null(schema: dict[str, Any]) -> None:
    """Say in the schema that only the ``NULLABLE`` fields take ``null`` (the model reads a
    missing field as ``None``; :meth:`ScheduleFields.changes` refuses a sent ``null``)."""
    for name, prop in schema.get("properties", {}).items():
        variants = prop.get("anyOf")
        if name in NULLABLE or not variants:
            continue
        kept = [v for v in variants if v.get("type") != "null"]
        if len(kept) == 1:
            del prop["anyOf"]
            prop.update(kept[0])
            prop.pop("default", None)


class ScheduleFields(BaseModel):
    """What every schedule may set (all optional when changing one; ``null`` only where the
    field may be empty)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_not_null)

    task: str | None = Field(default=None, min_length=1, max_length=200)
    args: dict[str, Any] | None = None
    cron: str | None = Field(default=None, min_length=1, max_length=200)
    every_s: Annotated[float | None, NumberOnly] = Field(default=None, ge=1, le=366 * 86400)
    timezone: str | None = Field(default=None, min_length=1, max_length=64)
    start_at: AwareDatetime | None = None
    end_at: AwareDatetime | None = None
    jitter_s: Annotated[float | None, NumberOnly] = Field(default=None, ge=0, le=3600)
    misfire: Literal["skip", "run_once"] | None = None
    max_lateness_s: Annotated[float | None, NumberOnly] = Field(default=None, ge=0, le=366 * 86400)
    overlap: Literal["allow", "skip_if_running"] | None = None
    enabled: bool | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the client sent, as the schedule record keeps them (epoch seconds); a
        ``null`` is refused where the field must have a value (the schema does not allow it)."""
        sent = self.model_dump(exclude_unset=True, exclude={"name"})
        for key, value in sent.items():
            if value is None and key not in NULLABLE:
                raise InvalidArguments(
                    f"{key}: may not be null",
                    details=[{"loc": ["body", key], "msg": "may not be null", "type": "value"}],
                )
        for key in ("start_at", "end_at"):
            if isinstance(sent.get(key), datetime):
                sent[key] = sent[key].timestamp()
        return sent


class ScheduleCreate(ScheduleFields):
    """Body of ``POST /schedules``."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    task: str = Field(min_length=1, max_length=200, description="A registered task type.")
    args: dict[str, Any] = Field(default_factory=dict)
    timezone: str = Field(default="UTC", min_length=1, max_length=64, description="IANA name.")


class ScheduleOut(BaseModel):
    id: str
    name: str
    task: str
    args: dict[str, Any]
    cron: str | None
    every_s: float | None
    timezone: str
    start_at: str | None
    end_at: str | None
    jitter_s: float
    misfire: str
    max_lateness_s: float
    overlap: str
    enabled: bool
    from_code: bool
    next_fire_at: str | None
    last_task_id: str | None
    created_at: str
    updated_at: str
    links: dict[str, str]


class SchedulePage(BaseModel):
    items: list[ScheduleOut]


class FireOut(BaseModel):
    fire_at: str
    outcome: Literal["fired", "triggered", "skipped_overlap", "missed"]
    task_id: str | None
    recorded_at: str


class FirePage(BaseModel):
    items: list[FireOut]
    next_cursor: str | None


class NextFire(BaseModel):
    utc: str
    local: str
    dst_gap: bool
    dst_fold: bool


class NextFires(BaseModel):
    timezone: str
    items: list[NextFire]


ScheduleId = Annotated[UUID, Path(description="The schedule's id (a UUID).")]


def build_schedule_router(yard: "Conveyor") -> APIRouter:
    """The ``/schedules`` routes over ``yard`` (included by ``yard.router()``)."""
    schedules = yard.schedules
    tenant = tenant_resolver(yard.settings)
    Tenant = Annotated[str, Depends(tenant)]
    router = APIRouter(route_class=strict_route_class(yard.settings.max_body_bytes))

    def out(record: Any, base: str) -> Response:
        return json_response(record.to_json(base))

    @router.post(
        "/schedules",
        status_code=201,
        summary="Create a schedule",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ScheduleCreate.model_json_schema()}},
            }
        },
        responses={201: {"model": ScheduleOut}, **documented(409, 422)},
        response_class=Response,
    )
    async def create(request: Request, owner: Tenant, base: Base) -> Response:
        body = parse_body(await request.body(), ScheduleCreate)
        record = await schedules.create(body.name, body.changes(), owner=owner, public_only=True)
        response = out(record, base)
        response.status_code = 201
        response.headers["Location"] = f"{base}/schedules/{record.id}"
        return response

    @router.get(
        "/schedules",
        summary="List schedules with their next fire time",
        response_model=SchedulePage,
        response_class=Response,
    )
    async def list_schedules(owner: Tenant, base: Base) -> Response:
        records = await schedules.list_schedules(owner=owner)
        return json_response({"items": [r.to_json(base) for r in records]})

    @router.get(
        "/schedules/{schedule_id}",
        summary="A schedule",
        response_model=ScheduleOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def get(schedule_id: ScheduleId, owner: Tenant, base: Base) -> Response:
        return out(await schedules.get(str(schedule_id), owner=owner), base)

    @router.patch(
        "/schedules/{schedule_id}",
        summary="Change a schedule (only the fields sent)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ScheduleFields.model_json_schema()}},
            }
        },
        responses={200: {"model": ScheduleOut}, **documented(404, 422)},
        response_class=Response,
    )
    async def update(
        schedule_id: ScheduleId, request: Request, owner: Tenant, base: Base
    ) -> Response:
        body = parse_body(await request.body(), ScheduleFields)
        changes = body.changes()
        return out(
            await schedules.update(str(schedule_id), changes, owner=owner, public_only=True), base
        )

    @router.delete(
        "/schedules/{schedule_id}",
        status_code=204,
        summary="Delete a schedule and its history (its tasks stay)",
        responses=documented(404, 422),
        response_class=Response,
    )
    async def delete(schedule_id: ScheduleId, owner: Tenant) -> Response:
        await schedules.delete(str(schedule_id), owner=owner)
        return Response(status_code=204)

    @router.post(
        "/schedules/{schedule_id}/pause",
        summary="Stop firing (planned fires while paused are not made up)",
        response_model=ScheduleOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def pause(schedule_id: ScheduleId, owner: Tenant, base: Base) -> Response:
        return out(await schedules.update(str(schedule_id), {"enabled": False}, owner=owner), base)

    @router.post(
        "/schedules/{schedule_id}/resume",
        summary="Fire again, from the next planned time",
        response_model=ScheduleOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def resume(schedule_id: ScheduleId, owner: Tenant, base: Base) -> Response:
        return out(await schedules.update(str(schedule_id), {"enabled": True}, owner=owner), base)

    @router.post(
        "/schedules/{schedule_id}/trigger",
        status_code=202,
        summary="Run the schedule's task once now (recorded as triggered)",
        responses={202: {"model": TaskOut}, **documented(404, 422, 429)},
        response_class=Response,
    )
    async def trigger(schedule_id: ScheduleId, owner: Tenant, base: Base) -> Response:
        task = await schedules.trigger(str(schedule_id), owner=owner)
        return json_response(task.to_json(base), 202, {"Location": f"{base}/tasks/{task.id}"})

    @router.get(
        "/schedules/{schedule_id}/next",
        summary="The next fire times, in UTC and local time, DST gaps and folds flagged",
        response_model=NextFires,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def next_fires(
        schedule_id: ScheduleId,
        owner: Tenant,
        count: Annotated[int, Query(ge=1, le=500)] = 10,
    ) -> Response:
        record = await schedules.get(str(schedule_id), owner=owner)
        moments = upcoming(record, count)
        return json_response(
            {
                "timezone": record.timezone,
                "items": [describe(moment, record.timezone) for moment in moments],
            }
        )

    @router.get(
        "/schedules/{schedule_id}/fires",
        summary="The schedule's history, newest first: each planned fire and what happened",
        response_model=FirePage,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def fires(
        schedule_id: ScheduleId,
        owner: Tenant,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?$")] = None,
    ) -> Response:
        before = float(cursor) if cursor is not None else None
        found = await schedules.fires(str(schedule_id), owner=owner, limit=limit + 1, before=before)
        page = found[:limit]
        next_cursor = repr(page[-1].fire_at) if len(found) > limit else None
        return json_response({"items": [f.to_json() for f in page], "next_cursor": next_cursor})

    return router
