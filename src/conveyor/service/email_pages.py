"""The email service's dashboard pages: ``/dashboard/emails`` (the emails, newest first) and
``/dashboard/emails/{id}`` (counts by recipient status, live; the recipients with their SMTP
replies, filtered by status; the CSV; cancel and retry, each a confirmed, CSRF-checked form)."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..dashboard.sections import Kit, Section
from .email import Emails, recipient_json
from .email_api import csv_response

TEMPLATES = Path(__file__).parent / "templates"
STATUSES = ("queued", "sending", "sent", "deferred", "bounced", "failed", "cancelled")
AGAIN = ("deferred", "failed", "bounced", "cancelled")  # what a retry can send again
EVENTS_S = 1.0
Status = Annotated[str | None, Query(pattern="^(|" + "|".join(STATUSES) + ")$")]
Cursor = Annotated[str | None, Query(max_length=18, pattern=r"^[0-9]+$")]


def email_section(service: Emails) -> Section:
    return Section(
        slug="emails", title="Emails", templates=TEMPLATES, routes=lambda kit: _routes(service, kit)
    )


def _routes(service: Emails, kit: Kit) -> APIRouter:
    router = APIRouter()
    Owner = Annotated[str | None, Depends(kit.tenant)]
    yard = service.yard

    @router.get("")
    async def emails(
        request: Request,
        owner: Owner,
        cursor: Annotated[str | None, Query(max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?$")] = None,
    ) -> Response:
        found = await service.list_emails(
            owner=owner, limit=kit.page + 1, before=float(cursor) if cursor else None
        )
        page = found[: kit.page]
        return kit.render(
            request,
            "emails.html",
            emails=[await service.to_json(batch) for batch in page],
            next_cursor=repr(page[-1].created_at) if len(found) > kit.page else None,
        )

    @router.get("/{email_id}")
    async def email(
        request: Request, email_id: str, owner: Owner, status: Status = None, cursor: Cursor = None
    ) -> Response:
        record = await service.get(email_id, owner=owner)
        recipients, next_seq = await service.recipients(
            record.id,
            owner=owner,
            status=status or None,
            after_seq=int(cursor) if cursor else None,
            limit=kit.page,
        )
        return kit.render(
            request,
            "email.html",
            email=await service.to_json(record),
            recipients=[recipient_json(task) for task in recipients],
            status=status or "",
            statuses=STATUSES,
            again=AGAIN,
            next_cursor=next_seq,
        )

    @router.get("/{email_id}/events", response_class=EventSourceResponse)
    async def events(email_id: str, owner: Owner) -> AsyncIterator[ServerSentEvent]:
        """The counts by recipient status while the page is open (the overview's shape)."""
        record = await service.get(email_id, owner=owner)
        last: dict[str, Any] | None = None
        while True:
            current = (await service.to_json(await service.get(record.id, owner=owner)))["counts"]
            if current != last:
                last = current
                yield ServerSentEvent(event="counts", data={"by_status": current})
            await asyncio.sleep(EVENTS_S)

    @router.get("/{email_id}/recipients.csv")
    async def recipients_csv(email_id: str, owner: Owner) -> StreamingResponse:
        record = await service.get(email_id, owner=owner)
        return csv_response(service, record.id, owner)

    @router.post("/{email_id}/cancel", dependencies=[Depends(kit.csrf_checked)])
    async def cancel(request: Request, email_id: str, owner: Owner) -> Response:
        record = await service.get(email_id, owner=owner)
        await yard.batches.cancel(record.id, owner=record.owner)
        return RedirectResponse(f"{kit.base(request)}/emails/{record.id}", 303)

    @router.post("/{email_id}/retry", dependencies=[Depends(kit.csrf_checked)])
    async def retry(
        request: Request,
        email_id: str,
        owner: Owner,
        status: Annotated[Literal["deferred", "failed", "bounced", "cancelled"], Form()],
    ) -> Response:
        record = await service.get(email_id, owner=owner)
        await service.retry(record.id, owner=record.owner, statuses={status})
        query = urlencode({"status": status})
        return RedirectResponse(f"{kit.base(request)}/emails/{record.id}?{query}", 303)

    return router
