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
import itertools
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, NotRequired
from weakref import WeakKeyDictionary

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict

from ..batch_record import BatchRecord
from ..context import TaskContext
from ..errors import BatchNotFound, InvalidArguments, PayloadTooLarge
from ..jobs.csvstats import neutralised
from ..jobs.email import (
    Bounced,
    Deferred,
    EmailInputError,
    SendError,
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
from ..tally import describe

describe(
    "conveyor_email_replies",
    "counter",
    "Send attempts by SMTP outcome: sent (2xx), deferred (4xx or no connection), bounced (5xx).",
)

if TYPE_CHECKING:
    from ..core import Conveyor

TASK = "email.send"
KIND = "email"
CSV_COLUMNS = ["email", "name", "status", "smtp_code", "smtp_reply", "attempts", "message_id"]
# a recipient status as its task's: (status, only this error type, not this error type)
_BY_TASK_STATUS: dict[str, tuple[TaskStatus, str | None, str | None]] = {
    "queued": (TaskStatus.QUEUED, None, "Deferred"),
    "deferred": (TaskStatus.QUEUED, "Deferred", None),
    "sending": (TaskStatus.RUNNING, None, None),
    "sent": (TaskStatus.COMPLETED, None, None),
    "bounced": (TaskStatus.FAILED, "Bounced", None),
    "failed": (TaskStatus.FAILED, None, "Bounced"),
    "cancelled": (TaskStatus.CANCELLED, None, None),
}


@with_config(ConfigDict(extra="forbid"))
class RecipientIn(TypedDict):
    """One recipient, kept as the dict it arrives as (measured on 100,000: validated as a
    dict in 0.16 s, as a model instance each in 0.9 s)."""

    email: Annotated[str, Field(min_length=3, max_length=320)]
    name: NotRequired[Annotated[str | None, Field(max_length=200)]]
    vars: NotRequired[dict[str, Any]]


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

    async def submit(
        self, body: EmailIn, *, owner: str, idempotency_key: str | None = None
    ) -> tuple[BatchRecord, bool]:
        """Check the message and its first recipient, then commit one task per distinct
        recipient, the others checked as the batch writes them (a bad one anywhere commits
        nothing): the email and whether it is new (``False``: the one first submitted with
        ``idempotency_key``)."""
        settings = self.yard.settings
        if len(body.recipients) > settings.email_max_recipients:
            raise PayloadTooLarge(
                f"{len(body.recipients)} recipients; at most {settings.email_max_recipients}"
            )
        try:
            meta = self._message_meta(body)
            templates = Templates(body.subject, body.text, body.html)
            items = self._items(body.recipients, meta["from"])
            first = next(items, None)
            if first is None:
                raise EmailInputError("recipients", "at least one recipient is required")
            templates.render(context(first))
        except EmailInputError as exc:
            raise _refused(exc.where, exc.reason) from exc
        delay = None
        if body.send_at is not None:
            delay = max(0.0, body.send_at.timestamp() - datetime.now(UTC).timestamp())
            meta["send_at"] = iso(body.send_at.timestamp())
        del body
        # the other recipients are checked while the batch writes the ones before them
        items = itertools.chain([first], items)
        batches = self.yard.batches
        options: dict[str, Any] = {"delay_s": delay, "meta": meta, "checked": True}
        if idempotency_key is None:
            return await batches.submit(TASK, items, owner=owner, **options), True
        return await batches.submit_once(idempotency_key, TASK, items, owner=owner, **options)

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

    def _items(self, recipients: list[RecipientIn], sender: str) -> Iterator[dict[str, Any]]:
        """``email.send``'s arguments per distinct recipient, each checked as it is made (a bad
        one raises ``InvalidArguments`` naming its place)."""
        domain = sender.rpartition("@")[2]
        seen: set[str] = set()
        try:
            for index, recipient in enumerate(recipients):
                address = valid_address(recipient["email"], f"recipients.{index}.email")
                name = recipient.get("name")
                if name is not None:
                    check_header(name, f"recipients.{index}.name")
                if address.lower() in seen:
                    continue  # one message per address, whatever the request repeats
                seen.add(address.lower())
                yield {
                    "to": address,
                    "name": name,
                    "vars": recipient.get("vars") or {},
                    "message_id": new_message_id(domain),
                }
        except EmailInputError as exc:
            raise _refused(exc.where, exc.reason) from exc

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
        try:
            accepted = await self.pool().send(message, sender=meta["from"], recipient=item["to"])
        except SendError as exc:
            outcome = "bounced" if isinstance(exc, Bounced) else "deferred"
            self.yard.tally.count("conveyor_email_replies", {"outcome": outcome})
            raise
        self.yard.tally.count("conveyor_email_replies", {"outcome": "sent"})
        return {
            "smtp_code": accepted.code,
            "smtp_reply": accepted.reply,
            "message_id": item["message_id"],
        }

    async def close(self) -> None:
        """Close the pooled SMTP connections (at the Conveyor's stop)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # reading -----------------------------------------------------------------------------------

    async def get(self, email_id: str, *, owner: str | None) -> BatchRecord:
        batch = await self.yard.batches.get(email_id, owner=owner)
        if batch.meta.get("kind") != KIND:
            raise BatchNotFound(f"no email with id {email_id}")
        return batch

    async def retry(self, email_id: str, *, owner: str | None, statuses: set[str]) -> BatchRecord:
        """Send again to the recipients in ``statuses``: ``failed``, ``bounced``, ``cancelled``
        (a new budget of attempts), ``deferred`` (now, instead of at the end of the backoff)."""
        await self.get(email_id, owner=owner)
        batches = self.yard.batches
        ended = statuses & {"failed", "bounced"}
        if ended:
            await batches.retry(
                email_id,
                owner=owner,
                statuses=(TaskStatus.FAILED,),
                only_error="Bounced" if ended == {"bounced"} else None,
                except_error="Bounced" if ended == {"failed"} else None,
            )
        if "cancelled" in statuses:
            await batches.retry(email_id, owner=owner, statuses=(TaskStatus.CANCELLED,))
        if "deferred" in statuses:
            await batches.retry_now(email_id, owner=owner, error_type="Deferred")
        return await self.get(email_id, owner=owner)

    async def to_json(self, batch: BatchRecord, base: str = "") -> dict[str, Any]:
        """The email's JSON; ``base`` is where the API is served, for its links."""
        errors = await self.yard.batches.error_counts(batch.id)
        deferred = errors.get(("queued", "Deferred"), 0)
        bounced = errors.get(("failed", "Bounced"), 0)
        counts = batch.counts
        home = f"{base}/emails/{batch.id}"
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
            "send_at": batch.meta.get("send_at"),
            "created_at": iso(batch.created_at),
            "finished_at": None if batch.active else iso(batch.finished_at),
            "links": {
                "self": home,
                "recipients": f"{home}/recipients",
                "events": f"{home}/events",
                "csv": f"{home}/recipients.csv",
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
        """A page of recipients (of one status: its task status and error type, read by the
        store), and the cursor of the next page."""
        await self.get(email_id, owner=owner)
        task_status, only, unless = (
            (None, None, None) if status is None else _BY_TASK_STATUS[status]
        )
        found = await self.yard.batches.items(
            email_id,
            owner=owner,
            status=task_status,
            after_seq=after_seq,
            limit=limit + 1,
            only_error=only,
            except_error=unless,
        )
        page = found[:limit]
        return page, page[-1].seq if len(found) > limit else None

    async def list_emails(
        self, *, owner: str | None, limit: int, before: float | None
    ) -> list[BatchRecord]:
        """Emails, newest first (``before``: created before this epoch time)."""
        return await self.yard.batches.list_batches(
            owner=owner, limit=limit, before=before, name=TASK
        )

    async def recipients_csv(self, email_id: str, *, owner: str | None) -> AsyncIterator[bytes]:
        """Every recipient and its status as CSV lines, formula-like cells neutralised (the
        email's visibility is checked before the first line)."""
        await self.get(email_id, owner=owner)
        yield _csv_line(CSV_COLUMNS)
        async for task in self.all_recipients(email_id, owner=owner):
            found = recipient_json(task)
            yield _csv_line([neutralised(found[column]) for column in CSV_COLUMNS])

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


def _csv_line(cells: list[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue().encode()


def recipients_from_csv(data: bytes, *, limit: int) -> list[dict[str, Any]]:
    """Recipients from CSV text: an ``email`` column, an optional ``name``, every other column
    a template variable; blank lines skipped. ``InvalidArguments`` locates what is wrong by
    the recipient's index and the CSV row."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _refused("recipients", f"the CSV is not UTF-8 (byte {exc.start})") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [cell.strip() for cell in next(rows, [])]
        lowered = [cell.lower() for cell in header]
        if "email" not in lowered:
            raise _refused("recipients", "the CSV's first row must name an 'email' column")
        if len(set(lowered)) != len(lowered):
            raise _refused("recipients", "the CSV's first row names a column twice")
        recipients: list[dict[str, Any]] = []
        for number, row in enumerate(rows, start=1):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise _refused(
                    f"recipients.{len(recipients)}",
                    f"row {number + 1} has {len(row)} cells; the header has {len(header)}",
                )
            if len(recipients) == limit:
                raise PayloadTooLarge(f"more than {limit} recipients")
            cells = dict(zip(lowered, row, strict=True))
            recipients.append(
                {
                    "email": cells["email"].strip(),
                    "name": cells.get("name") or None,
                    "vars": {
                        key: value
                        for key, low, value in zip(header, lowered, row, strict=True)
                        if low not in ("email", "name")
                    },
                }
            )
    except csv.Error as exc:
        raise _refused("recipients", f"unreadable CSV: {exc}") from None
    if not recipients:
        raise _refused("recipients", "the CSV names no recipient")
    return recipients


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
    yard.on_stop(service.close)
    _SERVICES[yard] = service
    return service
