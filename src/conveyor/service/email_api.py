"""The email service's routes: ``/emails`` and its recipients, over :class:`Emails`.

``POST /emails`` takes JSON (recipients listed in the body) or ``multipart/form-data`` with a
``message`` part (the same JSON without ``recipients``) and a ``recipients`` CSV file whose
``email``, ``name`` and other columns become each recipient's address, name and template
variables. Every route sees only the caller's emails.
"""

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import serialization
from ..api.auth import tenant_resolver
from ..api.errors import documented
from ..api.routing import Base, strict_route_class
from ..api.shapes import IDEMPOTENCY_HEADER, idempotency_key, json_response, parse_body
from ..batch_record import BatchRecord
from ..errors import ConveyorError, InvalidArguments
from ..settings import Settings
from ..task import validated
from .email import EmailIn, Emails, recipient_json, recipients_from_csv

if TYPE_CHECKING:
    from ..core import Conveyor


class EmailCounts(BaseModel):
    queued: int
    sending: int
    sent: int
    deferred: int
    bounced: int
    failed: int
    cancelled: int


class EmailOut(BaseModel):
    id: str
    status: Literal["active", "finished"]
    total: int
    counts: EmailCounts
    progress: float
    subject: str
    sender: str
    send_at: str | None
    created_at: str
    finished_at: str | None
    links: dict[str, str]


class EmailPage(BaseModel):
    items: list[EmailOut]
    next_cursor: str | None


class RecipientOut(BaseModel):
    email: str
    name: str | None
    status: str
    smtp_code: int | None
    smtp_reply: str | None
    attempts: int
    message_id: str
    next_attempt_at: str | None
    task_id: str


class RecipientPage(BaseModel):
    items: list[RecipientOut]
    next_cursor: str | None


EmailId = Annotated[UUID, Path(description="The email's id (a UUID).")]
_AGAIN = "(deferred|failed|bounced|cancelled)"
UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["message", "recipients"],
    "additionalProperties": False,
    "properties": {
        "message": {"type": "string", "description": "The JSON body without `recipients`."},
        "recipients": {
            "type": "string",
            "format": "binary",
            "description": "CSV: an `email` column, optional `name`, other columns as `vars`.",
        },
    },
}
RecipientStatus = Literal["queued", "sending", "sent", "deferred", "bounced", "failed", "cancelled"]


def build_email_router(yard: "Conveyor", service: Emails) -> APIRouter:
    settings = yard.settings
    tenant = tenant_resolver(settings)
    Tenant = Annotated[str, Depends(tenant)]
    router = APIRouter(
        prefix="/emails",
        tags=["emails"],
        route_class=strict_route_class(settings.max_batch_bytes),
    )

    async def visible_email(email_id: EmailId, owner: Tenant) -> BatchRecord:
        return await service.get(str(email_id), owner=owner)

    @router.post(
        "",
        status_code=202,
        summary="Send a message to many recipients, each with its own status",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": EmailIn.model_json_schema()},
                    "multipart/form-data": {"schema": UPLOAD_SCHEMA},
                },
            },
            "parameters": [IDEMPOTENCY_HEADER],
        },
        responses={
            202: {"model": EmailOut, "description": "Committed; `Location` names the email."},
            200: {"model": EmailOut, "description": "The email already submitted with this key."},
            **documented(413, 415, 422, 429),
        },
        response_class=Response,
    )
    async def submit(request: Request, owner: Tenant, base: Base) -> Response:
        key = idempotency_key(request)
        batch, created = await service.submit(  # the request's models are not held here:
            await read_submission(request, settings),  # submit lets them go before the tasks
            owner=owner,
            idempotency_key=key,
        )
        return json_response(
            await service.to_json(batch, base),
            202 if created else 200,
            {"Location": f"{base}/emails/{batch.id}"},
        )

    @router.get(
        "",
        summary="The caller's emails, newest first",
        response_model=EmailPage,
        responses=documented(422),
        response_class=Response,
    )
    async def list_emails(
        owner: Tenant,
        base: Base,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[
            str | None, Query(max_length=32, pattern=r"^[0-9]{1,12}(\.[0-9]{1,9})?$")
        ] = None,
    ) -> Response:
        found = await service.list_emails(
            owner=owner, limit=limit + 1, before=float(cursor) if cursor else None
        )
        page = found[:limit]
        return json_response(
            {
                "items": [await service.to_json(batch, base) for batch in page],
                "next_cursor": repr(page[-1].created_at) if len(found) > limit else None,
            }
        )

    @router.get(
        "/{email_id}",
        summary="An email: counts by recipient status, progress",
        response_model=EmailOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def get(email_id: EmailId, owner: Tenant, base: Base) -> Response:
        return json_response(
            await service.to_json(await service.get(str(email_id), owner=owner), base)
        )

    @router.get(
        "/{email_id}/recipients",
        summary="The recipients in submission order, optionally of one status",
        response_model=RecipientPage,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def recipients(
        email_id: EmailId,
        owner: Tenant,
        status: RecipientStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(max_length=18, pattern=r"^[0-9]{1,18}$")] = None,
    ) -> Response:
        page, next_seq = await service.recipients(
            str(email_id),
            owner=owner,
            status=status,
            after_seq=int(cursor) if cursor is not None else None,
            limit=limit,
        )
        return json_response(
            {
                "items": [recipient_json(task) for task in page],
                "next_cursor": None if next_seq is None else str(next_seq),
            }
        )

    @router.get(
        "/{email_id}/recipients.csv",
        summary="Every recipient and its status as CSV (formula-like cells neutralised)",
        responses={200: {"content": {"text/csv": {}}}, **documented(404, 422)},
        response_class=StreamingResponse,
    )
    async def recipients_csv(email_id: EmailId, owner: Tenant) -> StreamingResponse:
        await service.get(str(email_id), owner=owner)
        return csv_response(service, str(email_id), owner)

    @router.get(
        "/{email_id}/events",
        summary="Stream the email's counts (Server-Sent Events, coalesced) until it finishes",
        response_class=EventSourceResponse,
        responses=documented(404, 422),
    )
    async def events(
        email: Annotated[BatchRecord, Depends(visible_email)], owner: Tenant, base: Base
    ) -> AsyncIterator[ServerSentEvent]:
        try:
            async for current in yard.batches.watch(email.id, owner=owner):
                yield ServerSentEvent(event="counts", data=await service.to_json(current, base))
        except ConveyorError as exc:
            yield ServerSentEvent(event="error", data={"detail": exc.message})

    @router.post(
        "/{email_id}/cancel",
        summary="Cancel the recipients not yet sent",
        response_model=EmailOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def cancel(email_id: EmailId, owner: Tenant, base: Base) -> Response:
        await service.get(str(email_id), owner=owner)
        return json_response(
            await service.to_json(await yard.batches.cancel(str(email_id), owner=owner), base)
        )

    @router.post(
        "/{email_id}/retry",
        status_code=202,
        summary="Send again to the recipients of the listed statuses",
        description="`failed`, `bounced` and `cancelled` recipients are queued again with a new "
        "budget of attempts; `deferred` ones are tried now instead of at the end of their backoff.",
        responses={202: {"model": EmailOut}, **documented(404, 422)},
        response_class=Response,
    )
    async def retry(
        email_id: EmailId,
        owner: Tenant,
        base: Base,
        status: Annotated[
            str, Query(max_length=40, pattern=rf"^{_AGAIN}(,{_AGAIN}){{0,3}}$")
        ] = "failed",
    ) -> Response:
        batch = await service.retry(str(email_id), owner=owner, statuses=set(status.split(",")))
        return json_response(await service.to_json(batch, base), 202)

    return router


def csv_response(service: Emails, email_id: str, owner: str | None) -> StreamingResponse:
    """The recipients of a visible email as a CSV download."""
    return StreamingResponse(
        service.recipients_csv(email_id, owner=owner),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="email-{email_id}.csv"'},
    )


def _missing(part: str, message: str) -> InvalidArguments:
    return InvalidArguments(
        f"{part}: {message}",
        details=[{"loc": ["body", part], "msg": message, "type": "missing"}],
    )


async def read_submission(request: Request, settings: Settings) -> EmailIn:
    """The body of ``POST /emails``: JSON, or a ``message`` part and a ``recipients`` CSV."""
    raw = await request.body()  # capped (413) before any parsing
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return parse_body(raw, EmailIn)
    if media != "multipart/form-data":
        raise HTTPException(
            415,
            "POST /emails takes application/json or multipart/form-data, "
            f"not {content_type or 'no content type'}",
        )
    try:
        form = await request.form(max_files=2, max_fields=4, max_part_size=len(raw) + 1)
    except StarletteHTTPException as exc:  # the multipart parser's own refusal (400)
        raise InvalidArguments(
            f"unreadable multipart body: {exc.detail}",
            details=[{"loc": ["body"], "msg": str(exc.detail), "type": "value_error"}],
        ) from None
    try:
        unknown = sorted(set(form.keys()) - {"message", "recipients"})
        if unknown:
            raise InvalidArguments(
                f"unknown parts: {unknown}",
                details=[
                    {"loc": ["body", name], "msg": "not a part of this form", "type": "extra"}
                    for name in unknown
                ],
            )
        message, upload = form.get("message"), form.get("recipients")
        if isinstance(message, UploadFile):
            message = (await message.read()).decode("utf-8", "replace")
        if not isinstance(message, str):
            raise _missing("message", "a 'message' part (the JSON body without recipients)")
        if not isinstance(upload, UploadFile):
            raise _missing("recipients", "a 'recipients' file part (CSV)")
        csv_bytes = await upload.read()
    finally:
        await form.close()
    try:
        payload = serialization.loads(message.encode())
    except serialization.JSONError as exc:
        raise InvalidArguments(
            "the message part is not valid JSON",
            details=[{"loc": ["body", "message"], "msg": str(exc), "type": "json_invalid"}],
        ) from None
    if not isinstance(payload, dict) or "recipients" in payload:
        raise InvalidArguments(
            "the message part must be a JSON object without recipients",
            details=[
                {
                    "loc": ["body", "message"],
                    "msg": "a JSON object; the recipients come from the CSV part",
                    "type": "value_error",
                }
            ],
        )
    payload["recipients"] = recipients_from_csv(csv_bytes, limit=settings.email_max_recipients)
    return validated(EmailIn, payload, location=("body",), message="invalid request body")
