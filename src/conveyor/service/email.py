"""The email service: one request sends a message to many recipients, each with a status.

``POST /emails`` checks everything before answering (every address, every header, the templates
rendered once with the first recipient) and commits one batch of ``email.send`` tasks, one per
distinct recipient, in one transaction; the message itself (templates, sender, headers) is kept
with the batch. Each task renders its recipient's message and sends it on a pooled SMTP
connection (``jobs/email.py``). A recipient's status is its task's, in SMTP words:

| task | recipient |
| --- | --- |
| queued | ``queued``, or ``deferred`` when its last attempt got a 4xx reply or no connection |
| running | ``sending`` |
| completed | ``sent`` (the server's reply kept) |
| failed | ``bounced`` (a 5xx reply, never retried) or ``failed`` (retries used up) |
| cancelled | ``cancelled`` |

Delivery is at-least-once: a worker that dies after the server accepted a message and before the
outcome is written leaves the task to lease recovery, which sends it again with the same
``Message-ID`` (so receivers can tell). The window is the time between the server's reply to
``DATA`` and the commit of the outcome: a few milliseconds.
"""

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID
from weakref import WeakKeyDictionary

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from ..api.auth import tenant_resolver
from ..api.errors import documented
from ..api.routing import strict_route_class
from ..api.shapes import json_response, parse_body
from ..batch_record import BatchRecord
from ..context import TaskContext
from ..errors import BatchNotFound, ConveyorError, InvalidArguments, PayloadTooLarge
from ..jobs.csvstats import neutralised
from ..jobs.email import (
    Deferred,
    EmailInputError,
    SmtpPool,
    Templates,
    build_message,
    check_header,
    new_message_id,
    parse_smtp_url,
    valid_address,
)
from ..record import TaskRecord, iso
from ..status import TaskStatus

if TYPE_CHECKING:
    from ..core import Conveyor

TASK = "email.send"
KIND = "email"
_BY_TASK_STATUS = {
    "queued": TaskStatus.QUEUED,
    "deferred": TaskStatus.QUEUED,
    "sending": TaskStatus.RUNNING,
    "sent": TaskStatus.COMPLETED,
    "bounced": TaskStatus.FAILED,
    "failed": TaskStatus.FAILED,
    "cancelled": TaskStatus.CANCELLED,
}


class RecipientIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320)
    name: str | None = Field(default=None, max_length=200)
    vars: dict[str, Any] = Field(default_factory=dict)


class EmailIn(BaseModel):
    """Body of ``POST /emails``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    sender: str | None = Field(default=None, alias="from", min_length=3, max_length=320)
    from_name: str | None = Field(default=None, max_length=200)
    subject: str = Field(min_length=1, max_length=998)
    text: str | None = Field(default=None, max_length=1_000_000)
    html: str | None = Field(default=None, max_length=2_000_000)
    reply_to: str | None = Field(default=None, min_length=3, max_length=320)
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)
    recipients: list[RecipientIn] = Field(min_length=1)
    send_at: AwareDatetime | None = None


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
    created_at: str
    finished_at: str | None
    links: dict[str, str]


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


def _refused(where: str, message: str) -> InvalidArguments:
    loc = ["body", *(int(p) if p.isdigit() else p for p in where.split("."))]
    return InvalidArguments(
        f"{where}: {message}", details=[{"loc": loc, "msg": message, "type": "value_error"}]
    )


def recipient_status(task: TaskRecord) -> str:
    error_type = (task.error or {}).get("type")
    if task.status is TaskStatus.QUEUED:
        return "deferred" if error_type == "Deferred" else "queued"
    if task.status is TaskStatus.FAILED:
        return "bounced" if error_type == "Bounced" else "failed"
    return {
        TaskStatus.RUNNING: "sending",
        TaskStatus.COMPLETED: "sent",
        TaskStatus.CANCELLED: "cancelled",
    }[task.status]


def recipient_json(task: TaskRecord) -> dict[str, Any]:
    status = recipient_status(task)
    code: int | None = None
    reply: str | None = None
    if isinstance(task.result, dict):
        code, reply = task.result.get("smtp_code"), task.result.get("smtp_reply")
    elif task.error is not None:
        first, _, rest = str(task.error.get("message", "")).partition(" ")
        code, reply = (int(first), rest) if first.isdigit() else (None, task.error.get("message"))
    return {
        "email": task.args.get("to"),
        "name": task.args.get("name"),
        "status": status,
        "smtp_code": code,
        "smtp_reply": reply,
        "attempts": task.attempts,
        "message_id": task.args.get("message_id"),
        "next_attempt_at": iso(task.run_at) if status == "deferred" else None,
        "task_id": task.id,
    }


class Emails:
    """The email service of one Conveyor: submit, follow, cancel, retry (``emails_of(yard)``)."""

    def __init__(self, yard: "Conveyor") -> None:
        self.yard = yard
        self._pool: SmtpPool | None = None
        self._templates: dict[str, tuple[dict[str, Any], Templates]] = {}

    # submitting --------------------------------------------------------------------------------

    async def submit(self, body: EmailIn, *, owner: str) -> BatchRecord:
        """Check the whole message, then commit one task per distinct recipient."""
        settings = self.yard.settings
        if len(body.recipients) > settings.email_max_recipients:
            raise PayloadTooLarge(
                f"{len(body.recipients)} recipients; at most {settings.email_max_recipients}"
            )
        try:
            meta = self._message_meta(body)
            templates = Templates(body.subject, body.text, body.html)
            items = self._items(body, meta["from"])
            templates.render(context(items[0]))
        except EmailInputError as exc:
            raise _refused(exc.where, exc.reason) from exc
        delay = None
        if body.send_at is not None:
            delay = max(0.0, body.send_at.timestamp() - datetime.now(UTC).timestamp())
        return await self.yard.batches.submit(TASK, items, owner=owner, delay_s=delay, meta=meta)

    def _message_meta(self, body: EmailIn) -> dict[str, Any]:
        sender = body.sender or self.yard.settings.smtp_from
        if sender is None:
            raise EmailInputError("from", "required (no CONVEYOR_SMTP_FROM is set)")
        meta: dict[str, Any] = {
            "kind": KIND,
            "from": valid_address(sender, "from"),
            "from_name": None
            if body.from_name is None
            else check_header(body.from_name, "from_name"),
            "subject": check_header(body.subject, "subject"),
            "text": body.text,
            "html": body.html,
            "reply_to": None if body.reply_to is None else valid_address(body.reply_to, "reply_to"),
            "headers": {},
        }
        for name, value in body.headers.items():
            check_header(name, f"headers.{name}")
            meta["headers"][name] = check_header(value, f"headers.{name}")
        build_message(  # every header checked once, before anything is committed
            sender=meta["from"],
            sender_name=meta["from_name"],
            to=meta["from"],
            subject="",
            text="",
            html=None,
            message_id="<check@conveyor>",
            reply_to=meta["reply_to"],
            headers=meta["headers"],
        )
        return meta

    def _items(self, body: EmailIn, sender: str) -> list[dict[str, Any]]:
        domain = sender.rpartition("@")[2]
        seen: set[str] = set()
        items = []
        for index, recipient in enumerate(body.recipients):
            address = valid_address(recipient.email, f"recipients.{index}.email")
            if recipient.name is not None:
                check_header(recipient.name, f"recipients.{index}.name")
            if address.lower() in seen:
                continue  # one message per address, whatever the request repeats
            seen.add(address.lower())
            items.append(
                {
                    "to": address,
                    "name": recipient.name,
                    "vars": recipient.vars,
                    "message_id": new_message_id(domain),
                }
            )
        return items

    # sending -----------------------------------------------------------------------------------

    def pool(self) -> SmtpPool:
        if self._pool is None:
            settings = self.yard.settings
            target = parse_smtp_url(settings.smtp_url.get_secret_value())
            self._pool = SmtpPool(target, size=settings.smtp_connections)
        return self._pool

    async def message_of(self, batch_id: str) -> tuple[dict[str, Any], Templates]:
        """The message kept with the email's batch, its templates compiled once per process."""
        found = self._templates.get(batch_id)
        if found is None:
            batch = await self.yard.batches.get(batch_id)
            meta = batch.meta
            found = meta, Templates(meta["subject"], meta["text"], meta["html"])
            if len(self._templates) > 256:
                self._templates.clear()
            self._templates[batch_id] = found
        return found

    async def send(self, ctx: TaskContext, item: dict[str, Any]) -> dict[str, Any]:
        batch_id = ctx.batch_id
        if batch_id is None:
            raise RuntimeError("email.send runs only as part of an email")
        meta, templates = await self.message_of(batch_id)
        subject, text, html = templates.render(context(item))
        message = build_message(
            sender=meta["from"],
            sender_name=meta["from_name"],
            to=item["to"],
            to_name=item.get("name"),
            subject=subject,
            text=text,
            html=html,
            message_id=item["message_id"],
            reply_to=meta["reply_to"],
            headers=meta["headers"],
        )
        accepted = await self.pool().send(message, sender=meta["from"], recipient=item["to"])
        return {
            "smtp_code": accepted.code,
            "smtp_reply": accepted.reply,
            "message_id": item["message_id"],
        }

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    # reading -----------------------------------------------------------------------------------

    async def get(self, email_id: str, *, owner: str | None) -> BatchRecord:
        batch = await self.yard.batches.get(email_id, owner=owner)
        if batch.meta.get("kind") != KIND:
            raise BatchNotFound(f"no email with id {email_id}")
        return batch

    async def to_json(self, batch: BatchRecord) -> dict[str, Any]:
        errors = await self.yard.batches.error_counts(batch.id)
        deferred = errors.get(("queued", "Deferred"), 0)
        bounced = errors.get(("failed", "Bounced"), 0)
        counts = batch.counts
        base = f"/emails/{batch.id}"
        return {
            "id": batch.id,
            "status": "active" if batch.active else "finished",
            "total": batch.total,
            "counts": {
                "queued": counts["queued"] - deferred,
                "sending": counts["running"],
                "sent": counts["completed"],
                "deferred": deferred,
                "bounced": bounced,
                "failed": counts["failed"] - bounced,
                "cancelled": counts["cancelled"],
            },
            "progress": batch.progress,
            "subject": batch.meta.get("subject"),
            "sender": batch.meta.get("from"),
            "created_at": iso(batch.created_at),
            "finished_at": None if batch.active else iso(batch.finished_at),
            "links": {
                "self": base,
                "recipients": f"{base}/recipients",
                "events": f"{base}/events",
                "csv": f"{base}/recipients.csv",
            },
        }

    async def recipients(
        self,
        email_id: str,
        *,
        owner: str | None,
        status: str | None,
        after_seq: int | None,
        limit: int,
    ) -> tuple[list[TaskRecord], int | None]:
        """A page of recipients (of one status), and the cursor of the next page."""
        await self.get(email_id, owner=owner)
        task_status = None if status is None else _BY_TASK_STATUS[status]
        found = await self.yard.batches.items(
            email_id, owner=owner, status=task_status, after_seq=after_seq, limit=limit + 1
        )
        more = len(found) > limit
        page = found[:limit]
        next_seq = page[-1].seq if more else None
        if status is not None:
            page = [task for task in page if recipient_status(task) == status]
        return page, next_seq

    async def all_recipients(
        self, email_id: str, *, owner: str | None
    ) -> AsyncIterator[TaskRecord]:
        after: int | None = None
        while True:
            page = await self.yard.batches.items(
                email_id, owner=owner, status=None, after_seq=after, limit=1000
            )
            for task in page:
                yield task
            if len(page) < 1000:
                return
            after = page[-1].seq


def context(item: dict[str, Any]) -> dict[str, Any]:
    """A template's variables: the recipient's ``vars``, then its ``email`` and ``name``."""
    return {**item.get("vars", {}), "email": item["to"], "name": item.get("name") or ""}


_SERVICES: "WeakKeyDictionary[Conveyor, Emails]" = WeakKeyDictionary()


def emails_of(yard: "Conveyor") -> Emails:
    service = _SERVICES.get(yard)
    if service is None:
        raise LookupError("the email service is not registered on this Conveyor")
    return service


def register_email_tasks(yard: "Conveyor") -> Emails:
    """Register ``email.send`` (internal: submitted by ``POST /emails``)."""
    service = Emails(yard)
    settings = yard.settings

    async def email_send(
        ctx: TaskContext,
        to: str,
        message_id: str,
        name: str | None = None,
        vars: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Render and send one recipient's message."""
        item = {"to": to, "message_id": message_id, "name": name, "vars": vars or {}}
        return await service.send(ctx, item)

    yard.task(
        name=TASK,
        public=False,
        timeout_s=120,
        retries=settings.email_retries,
        retry_on=(Deferred,),
        concurrency=settings.smtp_connections,
        rate=settings.smtp_rate,
    )(email_send)
    _SERVICES[yard] = service
    return service


EmailId = Annotated[UUID, Path(description="The email's id (a UUID).")]
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
                "content": {"application/json": {"schema": EmailIn.model_json_schema()}},
            }
        },
        responses={202: {"model": EmailOut}, **documented(413, 422, 429)},
        response_class=Response,
    )
    async def submit(request: Request, owner: Tenant) -> Response:
        body = parse_body(await request.body(), EmailIn)
        batch = await service.submit(body, owner=owner)
        return json_response(await service.to_json(batch), 202, {"Location": f"/emails/{batch.id}"})

    @router.get(
        "/{email_id}",
        summary="An email: counts by recipient status, progress",
        response_model=EmailOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def get(email_id: EmailId, owner: Tenant) -> Response:
        return json_response(await service.to_json(await service.get(str(email_id), owner=owner)))

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
        columns = ["email", "name", "status", "smtp_code", "smtp_reply", "attempts", "message_id"]

        async def rows() -> AsyncIterator[bytes]:
            yield _csv_line(columns)
            async for task in service.all_recipients(str(email_id), owner=owner):
                found = recipient_json(task)
                yield _csv_line([neutralised(found[column]) for column in columns])

        return StreamingResponse(
            rows(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="email-{email_id}.csv"'},
        )

    @router.get(
        "/{email_id}/events",
        summary="Stream the email's counts (Server-Sent Events, coalesced) until it finishes",
        response_class=EventSourceResponse,
        responses=documented(404, 422),
    )
    async def events(
        email: Annotated[BatchRecord, Depends(visible_email)], owner: Tenant
    ) -> AsyncIterator[ServerSentEvent]:
        try:
            async for current in yard.batches.watch(email.id, owner=owner):
                yield ServerSentEvent(event="counts", data=await service.to_json(current))
        except ConveyorError as exc:
            yield ServerSentEvent(event="error", data={"detail": exc.message})

    @router.post(
        "/{email_id}/cancel",
        summary="Cancel the recipients not yet sent",
        response_model=EmailOut,
        responses=documented(404, 422),
        response_class=Response,
    )
    async def cancel(email_id: EmailId, owner: Tenant) -> Response:
        await service.get(str(email_id), owner=owner)
        return json_response(
            await service.to_json(await yard.batches.cancel(str(email_id), owner=owner))
        )

    @router.post(
        "/{email_id}/retry",
        status_code=202,
        summary="Send again to the recipients that failed (and/or were cancelled)",
        responses={202: {"model": EmailOut}, **documented(404, 422)},
        response_class=Response,
    )
    async def retry(
        email_id: EmailId,
        owner: Tenant,
        status: Annotated[
            str,
            Query(max_length=40, pattern=r"^(failed|cancelled)(,(failed|cancelled))?$"),
        ] = "failed",
    ) -> Response:
        await service.get(str(email_id), owner=owner)
        wanted = {TaskStatus(part) for part in status.split(",")}
        batch = await yard.batches.retry(str(email_id), owner=owner, statuses=wanted)
        return json_response(await service.to_json(batch), 202)

    return router


def _csv_line(cells: list[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue().encode()
