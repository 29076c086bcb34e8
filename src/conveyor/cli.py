"""The ``conveyor`` command: serve the API, run workers, submit and follow tasks.

A thin shell over public functions; every option is also settable as ``CONVEYOR_<OPTION>``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .core import Conveyor
from .errors import ConfigurationError
from .loader import load_yard
from .rates import parse_duration
from .settings import Settings, describe_errors
from .status import TERMINAL, TaskStatus
from .tasklogs import JsonFormatter, TextFormatter

app = typer.Typer(
    help="Conveyor: durable background tasks for FastAPI.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

Url = Annotated[
    str, typer.Option(envvar="CONVEYOR_URL", help="Base URL of a running `conveyor serve`.")
]
ApiKey = Annotated[
    str | None, typer.Option(envvar="CONVEYOR_API_KEY", help="Bearer key, when keys are set.")
]
Concurrency = Annotated[
    int | None,
    typer.Option(envvar="CONVEYOR_CONCURRENCY", min=1, help="Tasks run at once per process."),
]
DataDir = Annotated[
    Path | None,
    typer.Option(envvar="CONVEYOR_DATA_DIR", help="Where the SQLite store and blobs live."),
]
AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar="CONVEYOR_APP",
        help="module:attribute of your Conveyor instance (default: the built-in service).",
    ),
]


def _configure_logging(level: str) -> None:
    """Log to stderr at ``level``; ``CONVEYOR_LOG_FORMAT=json`` writes one JSON object per line.
    Records logged inside a task carry its id, type, attempt and worker either way."""
    fmt = os.environ.get("CONVEYOR_LOG_FORMAT", "text").lower()
    if fmt not in ("text", "json"):
        raise typer.BadParameter(f"CONVEYOR_LOG_FORMAT must be text or json, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _settings(concurrency: int | None, data_dir: Path | None) -> Settings:
    overrides: dict[str, Any] = {}
    if concurrency is not None:
        overrides["concurrency"] = concurrency
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return Settings(**overrides)


def _yard(app_path: str | None, concurrency: int | None, data_dir: Path | None) -> Conveyor:
    """The instance named by ``--app``, or the built-in service's."""
    if app_path is None:
        from .service import build_yard

        return build_yard(_settings(concurrency, data_dir))
    try:
        return load_yard(app_path)
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="CONVEYOR_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="CONVEYOR_PORT", min=0, max=65535)] = 8000,
    concurrency: Concurrency = None,
    data_dir: DataDir = None,
    workers: Annotated[
        bool, typer.Option(envvar="CONVEYOR_WORKERS", help="Run task workers in the server.")
    ] = True,
    log_level: Annotated[str, typer.Option(envvar="CONVEYOR_LOG_LEVEL")] = "info",
    access_log: Annotated[
        bool, typer.Option(envvar="CONVEYOR_ACCESS_LOG", help="Log each request.")
    ] = True,
    app_path: AppOption = None,
) -> None:
    """Serve the HTTP API (and run task workers), for the built-in task types or --app's."""
    import uvicorn

    from .service import create_app

    yard = _yard(app_path, concurrency, data_dir)
    yard.run_workers = workers
    settings = yard.settings
    if not settings.tenants_by_key() and not _is_loopback(host):
        errors.print(
            f"refusing to serve on {host} with no API keys: set CONVEYOR_API_KEYS "
            "(tenant:key,…) or bind to 127.0.0.1"
        )
        raise typer.Exit(2)
    _configure_logging(log_level)
    uvicorn.run(
        create_app(yard=yard),
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,
        access_log=access_log,
        # open event streams end after the grace period instead of holding the shutdown
        timeout_graceful_shutdown=max(math.ceil(settings.shutdown_grace_s), 1),
    )


@app.command()
def worker(
    concurrency: Concurrency = None,
    data_dir: DataDir = None,
    app_path: AppOption = None,
    log_level: Annotated[str, typer.Option(envvar="CONVEYOR_LOG_LEVEL")] = "info",
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            envvar="CONVEYOR_PROCESSES",
            help="Celery engine: pool processes (default: one per core).",
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option(envvar="CONVEYOR_POOL", help="Celery engine: prefork, threads or solo."),
    ] = "prefork",
) -> None:
    """Run task workers without the HTTP API, sharing the store with `conveyor serve`.

    With CONVEYOR_ENGINE=celery this is a Celery worker (prefork by default) consuming
    Conveyor's queue; `celery -A conveyor.celery_app worker` starts the same worker.
    """
    _configure_logging(log_level)
    yard = _yard(app_path, concurrency, data_dir)
    if yard.settings.engine == "celery":
        from .engines.celery_worker import run_celery_worker

        size = (
            (processes or os.cpu_count() or 1) if pool == "prefork" else yard.settings.concurrency
        )
        run_celery_worker(
            yard.celery_app(),
            queue=yard.settings.celery_queue,
            pool=pool,
            concurrency=size,
            log_level=log_level,
        )
        return
    asyncio.run(_run_until_signalled(yard))


@app.command()
def purge(
    older_than: Annotated[
        str, typer.Option(help="Finished more than this long ago: 1d, 12h, 30m, 90s.")
    ],
    status: Annotated[
        list[str] | None,
        typer.Option(help="completed, failed or cancelled (repeatable; default: all three)."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Delete finished tasks (results, blobs, log lines) from the store, in small batches."""
    try:
        seconds = parse_duration(older_than)
        statuses = [TaskStatus(s) for s in status] if status else sorted(TERMINAL)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if seconds is None:
        raise typer.BadParameter("--older-than must be a duration, not none")
    settings = _settings(None, data_dir)

    async def run() -> int:
        async with Conveyor(settings, run_workers=False) as yard:
            return await yard.retention.purge(seconds, statuses=statuses)

    try:
        deleted = asyncio.run(run())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(f"deleted {deleted} tasks finished more than {older_than} ago")


async def _run_until_signalled(yard: Conveyor) -> None:
    """Run ``yard``'s workers until SIGINT or SIGTERM, then stop them gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with yard:
        logging.getLogger("conveyor").info("worker running; Ctrl-C to stop")
        await stop.wait()


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30.0)


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        errors.print(f"[red]{response.status_code}[/red] {json.dumps(detail)}")
        raise typer.Exit(1)
    return response.json() if response.content else None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _request(method: str, url: str, api_key: str | None, path: str, **kwargs: Any) -> Any:
    try:
        with _client(url, api_key) as client:
            return _check(client.request(method, path, **kwargs))
    except httpx.TransportError as exc:
        errors.print(f"cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc


@app.command()
def submit(
    name: Annotated[str, typer.Argument(help="Task type, e.g. demo.sleep")],
    args: Annotated[
        list[str] | None, typer.Argument(help="key=value arguments; values parsed as JSON.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(envvar="CONVEYOR_WAIT", help="Follow progress until the task ends.")
    ] = False,
    priority: Annotated[
        int | None, typer.Option(envvar="CONVEYOR_PRIORITY", help="Higher runs first.")
    ] = None,
    delay_s: Annotated[
        float | None, typer.Option(envvar="CONVEYOR_DELAY_S", help="Start no sooner than this.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(envvar="CONVEYOR_IDEMPOTENCY_KEY", help="The same key answers the same task."),
    ] = None,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """Submit a task over HTTP; with --wait, show a live progress bar until it ends."""
    parsed: dict[str, Any] = {}
    for item in args or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        parsed[key] = _parse_value(value)
    body: dict[str, Any] = {"name": name, "args": parsed}
    if priority is not None:
        body["priority"] = priority
    if delay_s is not None:
        body["delay_s"] = delay_s
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    task = _request("POST", url, api_key, "/tasks", json=body, headers=headers)
    if not wait:
        console.print_json(data=task)
        return
    final = _follow(url, api_key, task)
    console.print_json(data=final)
    if final["status"] != "completed":
        raise typer.Exit(1)


def _follow(url: str, api_key: str | None, task: dict[str, Any]) -> dict[str, Any]:
    with (
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[message]}"),
            TimeElapsedColumn(),
            console=errors,
        ) as bar,
        _client(url, api_key) as client,
    ):
        line = bar.add_task(task["name"], total=100, message=task["status"])
        event = ""
        with client.stream("GET", f"/tasks/{task['id']}/events", timeout=None) as stream:
            for raw in stream.iter_lines():
                if raw.startswith("event:"):
                    event = raw.partition(":")[2].strip()
                elif raw.startswith("data:"):
                    data = json.loads(raw.partition(":")[2])
                    if event == "progress":
                        bar.update(line, completed=data["progress"], message=data["message"] or "")
                    elif event == "status":
                        bar.update(line, completed=data["progress"], message=data["status"])
        return _check(client.get(f"/tasks/{task['id']}"))  # type: ignore[no-any-return]


@app.command()
def status(
    task_id: Annotated[str, typer.Argument(help="The task's id")],
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """Show one task."""
    console.print_json(data=_request("GET", url, api_key, f"/tasks/{task_id}"))


@app.command("list")
def list_tasks(
    status: Annotated[
        str | None,
        typer.Option(
            envvar="CONVEYOR_STATUS", help="queued, running, completed, failed, cancelled"
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(envvar="CONVEYOR_NAME", help="A task type.")] = None,
    limit: Annotated[int, typer.Option(envvar="CONVEYOR_LIMIT", min=1, max=500)] = 20,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """List tasks, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if name:
        params["name"] = name
    page = _request("GET", url, api_key, "/tasks", params=params)
    # fits 80 columns with names of up to 12 characters; the id is never cut or wrapped (it is
    # copied into other commands), longer names wrap instead
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("name", "status", "%", "try", "created (UTC)"):
        table.add_column(column, overflow="fold")
    for item in page["items"]:
        table.add_row(
            item["id"],
            item["name"],
            item["status"],
            f"{item['progress']:.0f}",
            f"{item['attempts']}/{item['max_attempts']}",
            item["created_at"][5:16].replace("T", " "),
        )
    console.print(table)


@app.command()
def workers(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """The worker processes alive on the service's store."""
    page = _request("GET", url, api_key, "/workers")
    table = Table(box=None, pad_edge=False)
    table.add_column("id", no_wrap=True)
    for column in ("engine", "concurrency", "running", "last heartbeat"):
        table.add_column(column, overflow="fold")
    for item in page["items"]:
        table.add_row(
            item["id"],
            item["engine"],
            str(item["concurrency"]),
            str(item["running"]),
            item["last_heartbeat_at"][11:19],
        )
    console.print(table)


@app.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task's id")],
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """Cancel a queued or running task."""
    console.print_json(data=_request("POST", url, api_key, f"/tasks/{task_id}/cancel"))


@app.command()
def retry(
    task_id: Annotated[str, typer.Argument(help="The task's id")],
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """Run a failed or cancelled task again (its attempts start over)."""
    console.print_json(data=_request("POST", url, api_key, f"/tasks/{task_id}/retry"))


@app.command()
def logs(
    task_id: Annotated[str, typer.Argument(help="The task's id")],
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """Print a task's own log lines, every attempt's, oldest first."""
    cursor: str | None = None
    while True:
        params = {"cursor": cursor} if cursor else {}
        page = _request("GET", url, api_key, f"/tasks/{task_id}/logs", params=params)
        for line in page["items"]:
            console.print(
                f"{line['at']} {line['level']:<8} [attempt {line['attempt']}] {line['message']}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        cursor = page["next_cursor"]
        if cursor is None:
            return


schedules_app = typer.Typer(
    help="Periodic schedules: list them, see their next fires, pause, resume, trigger.",
    no_args_is_help=True,
)
app.add_typer(schedules_app, name="schedules")
ScheduleRef = Annotated[str, typer.Argument(help="The schedule's id or name.")]


def _schedule_id(url: str, api_key: str | None, ref: str) -> str:
    """The id of the schedule named (or identified) by ``ref``."""
    for item in _request("GET", url, api_key, "/schedules")["items"]:
        if ref in (item["id"], item["name"]):
            return str(item["id"])
    errors.print(f"no schedule named {ref!r}", markup=False)
    raise typer.Exit(1)


@schedules_app.command("list")
def schedules_list(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """Every schedule with its task, timing and next fire."""
    table = Table("id", "name", "task", "when", "timezone", "enabled", "next fire (UTC)")
    for item in _request("GET", url, api_key, "/schedules")["items"]:
        when = item["cron"] or f"every {item['every_s']:g} s"
        table.add_row(
            item["id"],
            item["name"],
            item["task"],
            when,
            item["timezone"],
            "yes" if item["enabled"] else "paused",
            item["next_fire_at"] or "-",
        )
    console.print(table)


@schedules_app.command("next")
def schedules_next(
    schedule: ScheduleRef,
    count: Annotated[int, typer.Option(min=1, max=500, help="How many fires.")] = 10,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """The next fire times, local and UTC, with DST gaps and folds flagged."""
    schedule_id = _schedule_id(url, api_key, schedule)
    found = _request("GET", url, api_key, f"/schedules/{schedule_id}/next", params={"count": count})
    table = Table("local", "UTC", "note")
    for item in found["items"]:
        note = (
            "DST gap: moved" if item["dst_gap"] else "DST fold: first" if item["dst_fold"] else ""
        )
        table.add_row(item["local"], item["utc"], note)
    console.print(table)


@schedules_app.command("fires")
def schedules_fires(
    schedule: ScheduleRef,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """The schedule's history, newest first: each planned fire and what happened."""
    schedule_id = _schedule_id(url, api_key, schedule)
    page = _request("GET", url, api_key, f"/schedules/{schedule_id}/fires", params={"limit": limit})
    table = Table("planned (UTC)", "outcome", "task")
    for item in page["items"]:
        table.add_row(item["fire_at"], item["outcome"], item["task_id"] or "-")
    console.print(table)


def _schedule_action(action: str, schedule: str, url: str, api_key: str | None) -> None:
    schedule_id = _schedule_id(url, api_key, schedule)
    console.print_json(data=_request("POST", url, api_key, f"/schedules/{schedule_id}/{action}"))


@schedules_app.command("pause")
def schedules_pause(
    schedule: ScheduleRef, url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None
) -> None:
    """Stop firing (fires planned while paused are not made up)."""
    _schedule_action("pause", schedule, url, api_key)


@schedules_app.command("resume")
def schedules_resume(
    schedule: ScheduleRef, url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None
) -> None:
    """Fire again, from the next planned time."""
    _schedule_action("resume", schedule, url, api_key)


@schedules_app.command("trigger")
def schedules_trigger(
    schedule: ScheduleRef, url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None
) -> None:
    """Run the schedule's task once now; prints the task."""
    _schedule_action("trigger", schedule, url, api_key)


def main() -> None:
    try:
        app()
    except ConfigurationError as exc:
        errors.print(f"conveyor: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except ValidationError as exc:
        if exc.title != Settings.__name__:  # a model of the app's own: its traceback helps
            raise
        for line in describe_errors(exc):
            errors.print(
                f"conveyor: invalid settings: {line}", markup=False, highlight=False, soft_wrap=True
            )
        raise SystemExit(2) from None
