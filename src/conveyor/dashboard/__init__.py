"""The dashboard: server-rendered pages over the store, mounted in any FastAPI app.

``app.mount("/dashboard", yard.dashboard())``. Pages (Jinja2, autoescaped; every asset served
from this package, no CDN, no build):

- ``/`` overview: counts by status and by task type, live workers, the oldest queued task's age;
  the counts refresh by Server-Sent Events (``/events``);
- ``/tasks``: the history, newest first, with the query parameters of ``GET /tasks``
  (``status``, ``name``, ``batch``, ``schedule``, ``id_prefix``, ``created_after``,
  ``created_before``, ``cursor``, ``limit``), so a view's URL is shareable;
- ``/workers``: the live worker processes, their slots and heartbeats;
- ``/schedules`` and ``/schedules/{id}``: schedules with their next fires (local time, DST
  flagged) and their history; trigger, pause and resume;
- ``/batches`` and ``/batches/{id}``: batches (emails among them) with their counts and
  progress, and a batch's items in submission order, filtered by status;
- ``/tasks/{id}``: arguments, result, error and traceback (each truncated at ``MAX_SHOWN``
  characters), progress live (``/tasks/{id}/events``), attempts and times, its log lines, its
  batch or schedule; cancel, retry and delete as POST forms with a CSRF token and a confirmation.

A ready service adds its own pages (``sections.py``): the emails and the ingestion sources.

Who sees what: with API keys set, a visitor gives a key once and gets a signed session cookie
(``session.py``), and sees only its tenant's tasks; ``yard.dashboard(auth=dependency)`` uses
the app's own authentication instead: a FastAPI dependency answering the tenant whose tasks are
shown, or None for every tenant's (an operator), or raising to refuse.
"""

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, Response
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..cron import describe
from ..errors import ConveyorError
from ..record import TaskRecord, iso, moment_of
from ..scheduler import upcoming
from ..status import TERMINAL, TaskStatus
from ..store.rows import NO_FILTER, TaskFilter
from ..tally import BY_MINUTE
from .sections import Kit
from .session import SESSION_COOKIE, SESSION_S, Signer

if TYPE_CHECKING:
    from ..core import Conveyor

HERE = Path(__file__).parent
MAX_SHOWN = 10_000
PAGE = 50
BULK_MAX = 1000  # the most tasks one bulk action touches
BULK = {
    "cancel": {TaskStatus.QUEUED, TaskStatus.RUNNING},
    "retry": {TaskStatus.FAILED, TaskStatus.CANCELLED},
}
BulkAction = Literal["cancel", "retry"]
OUTCOMES = ("completed", "failed", "cancelled")  # the chart's, bottom to top
EVENTS_S = 1.0  # the overview's counts are re-read this often while a page is open
Auth = Callable[..., Awaitable[str | None]]  # the tenant shown; None: every tenant
Acting = Callable[[Request, str, str | None, str], Awaitable[Response]]  # a form's action
# a form's "any" sends an empty value: the filter is then off
StatusFilter = Annotated[
    str | None, Query(pattern="^(|" + "|".join(s.value for s in TaskStatus) + ")$")
]


def shown(value: Any) -> str:
    """A JSON value as indented text, cut at ``MAX_SHOWN`` characters (escaped by the page)."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"\n… ({len(text):,} characters)"


def build_dashboard(yard: "Conveyor", *, auth: Auth | None = None) -> FastAPI:
    settings = yard.settings
    keys = settings.tenants_by_key()
    signer = Signer(settings)
    sections = list(yard.dashboard_sections)
    folders = [HERE / "templates", *(section.templates for section in sections)]
    pages = Environment(
        loader=FileSystemLoader(folders),
        autoescape=select_autoescape(["html"]),
        auto_reload=False,
    )
    pages.filters["iso"] = iso
    pages.filters["shown"] = shown
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GZipMiddleware, minimum_size=1024)  # event streams are left alone
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(ConveyorError)
    async def refused(request: Request, exc: ConveyorError) -> Response:
        """A refusal of the core that a page did not turn into its own error (a store that is
        down, a value it cannot hold): its status and message, as the API answers it."""
        return JSONResponse({"detail": exc.message}, exc.status_code)

    async def session_tenant(request: Request) -> str | None:
        if not keys:
            return None
        tenant = signer.tenant(request.cookies.get(SESSION_COOKIE))
        if tenant is None:
            raise HTTPException(303, headers={"Location": f"{base(request)}/login"})
        return tenant

    tenant_of: Auth = auth or session_tenant

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def render(request: Request, name: str, status_code: int = 200, **values: Any) -> Response:
        cookie = request.cookies.get(SESSION_COOKIE)
        html = pages.get_template(name).render(
            base=base(request),
            csrf=signer.csrf(cookie),
            keyed=bool(keys) and auth is None,
            sections=[section.link() for section in sections],
            **values,
        )
        return HTMLResponse(html, status_code, headers={"Cache-Control": "no-store"})

    async def csrf_checked(request: Request, csrf: str | None = Form(default=None)) -> None:
        if not signer.csrf_ok(request.cookies.get(SESSION_COOKIE), csrf):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")

    async def counts(owner: str | None) -> dict[str, Any]:
        snapshot = await yard.store.stats().snapshot(owner=owner)
        by_status = {status.value: 0 for status in TaskStatus}
        by_type: dict[str, dict[str, int]] = {}
        for (name, status), n in snapshot.counts.items():
            by_status[status] = by_status.get(status, 0) + n
            by_type.setdefault(name, {s.value: 0 for s in TaskStatus})[status] = n
        return {
            "by_status": by_status,
            "by_type": dict(sorted(by_type.items())),
            "oldest_queued_s": snapshot.oldest_queued_age_s if owner is None else None,
        }

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        return render(request, "login.html", error=None)

    @app.post("/login")
    async def login(request: Request, key: str = Form(max_length=500)) -> Response:
        tenant = next((t for k, t in keys.items() if secrets.compare_digest(k, key)), None)
        if tenant is None:
            return render(request, "login.html", 401, error="This key is not known.")
        response = RedirectResponse(f"{base(request)}/", 303)
        response.set_cookie(
            SESSION_COOKIE,
            signer.session(tenant),
            max_age=SESSION_S,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=base(request) or "/",
        )
        return response

    async def last_hour(owner: str | None) -> dict[str, Any]:
        """Tasks ended per minute over the last hour, by outcome (the tally's minutes)."""
        first = int(time.time() // 60 * 60) - 59 * 60
        minutes = {m: dict.fromkeys(OUTCOMES, 0.0) for m in range(first, first + 3600, 60)}
        for labels, start, n in await yard.store.stats().since(BY_MINUTE, str(first)):
            found = json.loads(labels)
            if (owner is None or found.get("owner") == owner) and int(start) in minutes:
                outcome = found.get("outcome")
                if outcome in OUTCOMES:
                    minutes[int(start)][outcome] += n
        bars = list(minutes.items())
        tallest = max((sum(c.values()) for _, c in bars), default=0) or 1
        totals = {o: int(sum(c[o] for _, c in bars)) for o in OUTCOMES}
        return {"bars": bars, "tallest": tallest, "totals": totals}

    @app.get("/", response_class=HTMLResponse)
    async def overview(request: Request, owner: str | None = Depends(tenant_of)) -> Response:
        workers = await yard.store.workers().alive(lease_s=settings.lease_s)
        return render(
            request,
            "overview.html",
            **await counts(owner),
            workers=workers,
            hour=await last_hour(owner),
        )

    @app.get("/events", response_class=EventSourceResponse)
    async def overview_events(
        owner: str | None = Depends(tenant_of),
    ) -> AsyncIterator[ServerSentEvent]:
        last: dict[str, Any] | None = None
        while True:
            current = await counts(owner)
            if current != last:
                last = current
                yield ServerSentEvent(event="counts", data=current)
            await asyncio.sleep(EVENTS_S)

    @app.get("/tasks", response_class=HTMLResponse)
    async def tasks(
        request: Request,
        owner: str | None = Depends(tenant_of),
        status: StatusFilter = None,
        name: str | None = Query(default=None, max_length=200),
        limit: int = Query(default=PAGE, ge=1, le=500),
        cursor: str | None = Query(default=None, max_length=18, pattern=r"^[0-9]+$"),
        done: str | None = Query(default=None, pattern=r"^(cancel|retry):[0-9]{1,6}$"),
        narrowing: tuple[TaskFilter, dict[str, str]] = Depends(narrowed_by),
    ) -> Response:
        narrowed, shown_filter = narrowing
        found = await yard.list(
            owner=owner,
            status=_status(status),
            name=name or None,
            limit=limit + 1,
            before_seq=int(cursor) if cursor else None,
            narrowed=narrowed,
        )
        more = len(found) > limit
        page = found[:limit]
        query = {
            "status": status or "",
            "name": name or "",
            **shown_filter,
            "limit": limit,
            "cursor": cursor or "",
        }
        return render(
            request,
            "tasks.html",
            filters=urlencode({k: v for k, v in query.items() if k not in ("limit", "cursor")}),
            tasks=page,
            statuses=[s.value for s in TaskStatus],
            query=query,
            next_cursor=str(page[-1].seq) if more and page else None,
            bulk=[
                a for a, among in BULK.items() if _status(status) in among and narrowed == NO_FILTER
            ],
            done=done.split(":") if done else None,
        )

    @app.get("/tasks/bulk", response_class=HTMLResponse)
    async def bulk_form(
        request: Request,
        action: BulkAction,
        owner: str | None = Depends(tenant_of),
        status: StatusFilter = None,
        name: str | None = Query(default=None, max_length=200),
    ) -> Response:
        """What a bulk action would touch, counted (up to ``BULK_MAX``) before it is asked."""
        chosen = bulk_status(action, status)
        found = await yard.store.list_tasks(
            owner=owner, status=chosen, name=name or None, limit=BULK_MAX + 1
        )
        return render(
            request,
            "bulk.html",
            action=action,
            status=chosen.value,
            type_name=name or "",
            count=min(len(found), BULK_MAX),
            more=len(found) > BULK_MAX,
            cap=BULK_MAX,
        )

    @app.post("/tasks/bulk")
    async def bulk(
        request: Request,
        action: Annotated[BulkAction, Form()],
        status: Annotated[str, Form(max_length=20)],
        name: Annotated[str, Form(max_length=200)] = "",
        owner: str | None = Depends(tenant_of),
        _: None = Depends(csrf_checked),
    ) -> Response:
        """Cancel or retry the tasks of one status (and type), newest first, at most
        ``BULK_MAX``; a task whose state changed meanwhile is left as it is."""
        chosen = bulk_status(action, status)
        found = await yard.store.list_tasks(
            owner=owner, status=chosen, name=name or None, limit=BULK_MAX
        )
        act_on = yard.cancel if action == "cancel" else yard.retry
        done = 0
        for start in range(0, len(found), 100):
            outcomes = await asyncio.gather(
                *(act_on(t.id, owner=t.owner) for t in found[start : start + 100]),
                return_exceptions=True,
            )
            done += sum(not isinstance(o, BaseException) for o in outcomes)
        query = urlencode({"status": chosen.value, "name": name, "done": f"{action}:{done}"})
        return RedirectResponse(f"{base(request)}/tasks?{query}", 303)

    @app.get("/tasks/live", response_class=EventSourceResponse)
    async def tasks_live(
        owner: str | None = Depends(tenant_of),
        status: StatusFilter = None,
        name: str | None = Query(default=None, max_length=200),
        limit: int = Query(default=PAGE, ge=1, le=500),
        narrowing: tuple[TaskFilter, dict[str, str]] = Depends(narrowed_by),
    ) -> AsyncIterator[ServerSentEvent]:
        """The first page of the history, sent again each time it changes (new tasks,
        statuses, progress): what the tasks page shows without a reload."""
        last: list[tuple[str, str, float]] | None = None
        while True:
            page = await yard.list(
                owner=owner,
                status=_status(status),
                name=name or None,
                limit=limit,
                narrowed=narrowing[0],
            )
            key = [(t.id, t.status.value, t.progress) for t in page]
            if key != last:
                last = key
                yield ServerSentEvent(event="page", data=[_row(t) for t in page])
            await asyncio.sleep(EVENTS_S)

    @app.get("/batches", response_class=HTMLResponse)
    async def batches(
        request: Request,
        owner: str | None = Depends(tenant_of),
        cursor: str | None = Query(default=None, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?$"),
    ) -> Response:
        found = await yard.batches.list_batches(
            owner=owner, limit=PAGE + 1, before=float(cursor) if cursor else None
        )
        page = found[:PAGE]
        more = len(found) > PAGE
        return render(
            request,
            "batches.html",
            batches=page,
            next_cursor=repr(page[-1].created_at) if more and page else None,
        )

    @app.get("/batches/{batch_id}", response_class=HTMLResponse)
    async def batch(
        request: Request,
        batch_id: str,
        owner: str | None = Depends(tenant_of),
        status: StatusFilter = None,
        cursor: str | None = Query(default=None, max_length=18, pattern=r"^[0-9]+$"),
    ) -> Response:
        record = await yard.batches.get(batch_id, owner=owner)
        items = await yard.batches.items(
            batch_id,
            owner=owner,
            status=_status(status),
            after_seq=int(cursor) if cursor else None,
            limit=PAGE + 1,
        )
        page = items[:PAGE]
        return render(
            request,
            "batch.html",
            batch=record,
            items=page,
            status=status or "",
            statuses=[s.value for s in TaskStatus],
            next_cursor=str(page[-1].seq) if len(items) > PAGE and page else None,
        )

    @app.get("/workers", response_class=HTMLResponse)
    async def workers(request: Request, owner: str | None = Depends(tenant_of)) -> Response:
        alive = await yard.store.workers().alive(lease_s=settings.lease_s)
        return render(request, "workers.html", workers=alive, lease_s=settings.lease_s)

    @app.get("/schedules", response_class=HTMLResponse)
    async def schedules(request: Request, owner: str | None = Depends(tenant_of)) -> Response:
        found = await yard.schedules.list_schedules(owner=owner)
        return render(request, "schedules.html", schedules=found)

    @app.get("/schedules/{schedule_id}", response_class=HTMLResponse)
    async def schedule(
        request: Request,
        schedule_id: str,
        owner: str | None = Depends(tenant_of),
        cursor: str | None = Query(default=None, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?$"),
    ) -> Response:
        record = await yard.schedules.get(schedule_id, owner=owner)
        fires = await yard.schedules.fires(
            record.id, owner=owner, limit=PAGE + 1, before=float(cursor) if cursor else None
        )
        page = fires[:PAGE]
        return render(
            request,
            "schedule.html",
            schedule=record,
            fires=page,
            upcoming=[describe(m, record.timezone) for m in upcoming(record, 5)],
            next_cursor=repr(page[-1].fire_at) if len(fires) > PAGE and page else None,
        )

    async def act_on_schedule(
        request: Request, schedule_id: str, owner: str | None, action: str
    ) -> Response:
        record = await yard.schedules.get(schedule_id, owner=owner)
        if action == "trigger":
            task = await yard.schedules.trigger(record.id, owner=record.owner)
            return RedirectResponse(f"{base(request)}/tasks/{task.id}", 303)
        changes = {"enabled": action == "resume"}
        await yard.schedules.update(record.id, changes, owner=record.owner)
        return RedirectResponse(f"{base(request)}/schedules/{record.id}", 303)

    @app.get("/tasks/{task_id}", response_class=HTMLResponse)
    async def task(
        request: Request, task_id: str, owner: str | None = Depends(tenant_of)
    ) -> Response:
        record = await yard.get(task_id, owner=owner)
        lines = await yard.store.logs().read(record.id, after=0, limit=1000)
        return render(
            request,
            "task.html",
            task=record,
            lines=[line for _, line in lines],
            terminal=record.status in TERMINAL,
        )

    @app.get("/tasks/{task_id}/events", response_class=EventSourceResponse)
    async def task_events(
        task_id: str, owner: str | None = Depends(tenant_of)
    ) -> AsyncIterator[ServerSentEvent]:
        record = await yard.get(task_id, owner=owner)
        async for current in yard.watch(record.id, owner=record.owner):
            yield ServerSentEvent(
                event="task",
                data={
                    "status": current.status.value,
                    "progress": current.progress,
                    "message": current.message,
                    "attempts": current.attempts,
                },
            )

    async def act(request: Request, task_id: str, owner: str | None, action: str) -> Response:
        record = await yard.get(task_id, owner=owner)
        if action == "cancel":
            await yard.cancel(record.id, owner=record.owner)
        elif action == "retry":
            await yard.retry(record.id, owner=record.owner)
        else:
            await yard.delete(record.id, owner=record.owner)
            return RedirectResponse(f"{base(request)}/tasks", 303)
        return RedirectResponse(f"{base(request)}/tasks/{record.id}", 303)

    def action_route(kind: str, action: str, acting: Acting) -> None:
        """``POST /{kind}/{id}/{action}``: a form's action, after its CSRF token is checked."""

        async def handler(
            request: Request,
            item_id: str,
            owner: str | None = Depends(tenant_of),
            _: None = Depends(csrf_checked),
        ) -> Response:
            return await acting(request, item_id, owner, action)

        app.post(f"/{kind}/{{item_id}}/{action}", name=f"{kind}_{action}")(handler)

    for action in ("cancel", "retry", "delete"):
        action_route("tasks", action, act)
    for action in ("trigger", "pause", "resume"):
        action_route("schedules", action, act_on_schedule)

    kit = Kit(render=render, tenant=tenant_of, csrf_checked=csrf_checked, base=base, page=PAGE)
    for section in sections:
        app.include_router(section.routes(kit), prefix=f"/{section.slug}")
    return app


def _row(task: TaskRecord) -> dict[str, Any]:
    return {
        "id": task.id,
        "name": task.name,
        "status": task.status.value,
        "progress": round(task.progress),
        "attempts": f"{task.attempts}/{task.max_attempts}",
        "created_at": iso(task.created_at),
    }


def narrowed_by(
    batch: str | None = Query(default=None, max_length=64),
    schedule: str | None = Query(default=None, max_length=64),
    id_prefix: str | None = Query(default=None, pattern=r"^([0-9a-f-]{8,36})?$"),
    created_after: str | None = Query(default=None, max_length=40),
    created_before: str | None = Query(default=None, max_length=40),
) -> tuple[TaskFilter, dict[str, str]]:
    """The task list's narrowing (a form's empty field: none), and its values for links. Times
    are ISO 8601; one without a zone (the form's) is UTC."""
    times = {"created_after": created_after, "created_before": created_before}
    moments: dict[str, float | None] = {}
    for key, text in times.items():
        moments[key] = None
        if text:
            try:
                moments[key] = moment_of(text, naive_is_utc=True)
            except ValueError:
                raise HTTPException(422, f"{key}: not an ISO 8601 time: {text!r}") from None
    narrowed = TaskFilter(
        batch_id=batch or None, schedule_id=schedule or None, id_prefix=id_prefix or None, **moments
    )
    shown = {
        "batch": batch or "",
        "schedule": schedule or "",
        "id_prefix": id_prefix or "",
        "created_after": created_after or "",
        "created_before": created_before or "",
    }
    return narrowed, shown


def bulk_status(action: str, status: str | None) -> TaskStatus:
    """The status a bulk action applies to: cancel queued or running tasks, retry failed or
    cancelled ones (``422`` otherwise)."""
    chosen = _status(status) if status in {s.value for s in TaskStatus} else None
    if chosen is None or chosen not in BULK[action]:
        allowed = " or ".join(sorted(s.value for s in BULK[action]))
        raise HTTPException(422, f"{action} applies to {allowed} tasks: choose one of them")
    return chosen


def _status(value: str | None) -> TaskStatus | None:
    return TaskStatus(value) if value else None
