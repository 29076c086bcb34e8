"""The ingestion service: fetch an HTTP API on a schedule and upsert its records into a local
database (``/ingest/sources``).

A source says where to fetch (``url``, ``params``, write-only ``headers``), how to read
(``records_path``, ``pagination``), what identifies a record (``primary_key``), how to fetch
only what changed (``cursor``), when (``every_s`` or ``cron``, a schedule of the internal task
type ``ingest.run``), within which limits, and into which ``table``. A run is a task like any
other: progress, cancel, retry and SSE work unchanged; its result counts pages and rows.

Sources, their tables and their cursors live in the ingestion database
(``CONVEYOR_INGEST_DATABASE_URL``, by default ``ingest.db`` in the data folder): a page's rows
and the cursor must share one transaction, so they share one database.
"""

import contextlib
import functools
import time
import weakref
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import orjson
import sqlalchemy as sa

from ..context import TaskContext
from ..errors import (
    ConfigurationError,
    ConveyorError,
    InvalidArguments,
    ScheduleNotFound,
    TaskNotFound,
)
from ..ids import uuid7
from ..jobs.fetch import FetchError, FetchStats, Limits, Pagination, pages
from ..jobs.netguard import guarded_transport
from ..jobs.upsert import MAX_REJECTS, Target
from ..record import TaskRecord
from ..tally import describe
from ..task import validated
from .ingest_models import SourceIn

describe("conveyor_ingest_pages", "counter", "Pages fetched by ingestion runs that completed.")
describe(
    "conveyor_ingest_rows",
    "counter",
    "Records of completed ingestion runs: inserted, updated, unchanged, rejected.",
)

if TYPE_CHECKING:
    from ..core import Conveyor

TASK = "ingest.run"
MAX_RUNS_KEPT = 50  # the runs of a source a listing shows
FIXED = frozenset({"name", "table", "primary_key", "columns"})  # what a change cannot touch


def _sources_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "conveyor_ingest_sources",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("table_name", sa.String(64), nullable=False, unique=True),
        sa.Column("schedule_id", sa.String(64)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("owner", "name"),
    )


def _runs_table(metadata: sa.MetaData) -> sa.Table:
    """The latest runs of each source (``MAX_RUNS_KEPT``), newest first by ``started_at``."""
    return sa.Table(
        "conveyor_ingest_runs",
        metadata,
        sa.Column("source_id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("started_at", sa.Float, nullable=False, index=True),
    )


class SourceNotFound(ConveyorError):
    """No source with that id (or not this tenant's)."""

    status_code = 404


class SourceConflict(ConveyorError):
    """A source of that name, or a table of that name, exists already."""

    status_code = 409


_SERVICES: "weakref.WeakKeyDictionary[Conveyor, Ingestion]" = weakref.WeakKeyDictionary()


def ingestion_of(yard: "Conveyor") -> "Ingestion | None":
    """The ingestion service registered on ``yard`` (None: not registered)."""
    return _SERVICES.get(yard)


def target_url(url: str) -> str:
    """The SQLAlchemy URL of the ingestion database: a SQLite file, or PostgreSQL through
    psycopg (``postgresql://`` and ``postgres://`` are taken as such)."""
    if url.startswith("sqlite:///"):
        return url
    for scheme in ("postgresql://", "postgres://", "postgresql+psycopg://"):
        if url.startswith(scheme):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ConfigurationError(
                    "CONVEYOR_INGEST_DATABASE_URL: a PostgreSQL target needs psycopg "
                    "(pip install 'conveyor[ingest]')"
                ) from None
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    raise ConfigurationError(
        "CONVEYOR_INGEST_DATABASE_URL: sqlite:///<file> or postgresql://<user>@<host>/<database>"
    )


class Ingestion:
    """The ingestion service of one Conveyor instance."""

    def __init__(self, yard: "Conveyor") -> None:
        self.yard = yard
        settings = yard.settings
        self.url = target_url(
            settings.ingest_database_url or f"sqlite:///{settings.data_dir / 'ingest.db'}"
        )
        self._engine: sa.Engine | None = None
        self.metadata = sa.MetaData()
        self.sources = _sources_table(self.metadata)
        self.runs_kept = _runs_table(self.metadata)
        self.allow_hosts = [h.strip() for h in settings.ingest_allow_hosts.split(",") if h.strip()]
        self.targets: dict[str, Target] = {}

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            if self.url.startswith("sqlite:///"):
                self.yard.settings.data_dir.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(self.url, pool_pre_ping=True)
            if engine.dialect.name == "sqlite":
                sa.event.listen(engine, "connect", _sqlite_pragmas)
            self.metadata.create_all(engine)
            self._engine = engine
        return self._engine

    def client(self, timeout_s: float) -> httpx.AsyncClient:
        """An HTTP client whose every connection passes the SSRF guard; at most 3 redirects."""
        return httpx.AsyncClient(
            transport=guarded_transport(self.allow_hosts),
            timeout=timeout_s,
            follow_redirects=True,
            max_redirects=3,
            trust_env=False,
        )

    # sources --------------------------------------------------------------------------------

    async def create(self, spec: SourceIn, *, owner: str) -> dict[str, Any]:
        source_id = uuid7()
        body = spec.model_dump(mode="json", exclude={"headers"})
        table = spec.table
        assert table is not None
        row = {
            "id": source_id,
            "owner": owner,
            "name": spec.name,
            "spec": orjson.dumps(body).decode(),
            "headers": orjson.dumps(spec.headers).decode(),
            "table_name": spec.table,
            "schedule_id": None,
            "created_at": time.time(),
        }

        def insert() -> None:
            with self.engine.begin() as conn:
                taken = conn.execute(
                    sa.select(self.sources.c.owner, self.sources.c.name).where(
                        sa.or_(
                            sa.and_(
                                self.sources.c.owner == owner, self.sources.c.name == spec.name
                            ),
                            self.sources.c.table_name == spec.table,
                        )
                    )
                ).first()
                if taken is not None:
                    what = "name" if taken[1] == spec.name and taken[0] == owner else "table"
                    raise SourceConflict(f"a source with this {what} exists already")
                if sa.inspect(conn).has_table(table):
                    raise SourceConflict(f"table {table!r} exists already")
                conn.execute(self.sources.insert().values(**row))

        await anyio.to_thread.run_sync(insert)
        if spec.every_s is not None or spec.cron is not None:
            try:
                schedule = await self.yard.schedules.create(
                    f"ingest:{spec.name}",
                    {
                        "task": TASK,
                        "args": {"source_id": source_id},
                        "every_s": spec.every_s,
                        "cron": spec.cron,
                        "timezone": spec.timezone,
                    },
                    owner=owner,
                )
            except ConveyorError:
                await anyio.to_thread.run_sync(self._delete_row, source_id)
                raise
            row["schedule_id"] = schedule.id
            await anyio.to_thread.run_sync(self._set_schedule, source_id, schedule.id)
        return _shown(row)

    async def update(
        self, source_id: str, changes: dict[str, Any], *, owner: str
    ) -> dict[str, Any]:
        """Change the fields in ``changes`` (``headers`` replaced whole); the source is checked
        again as a whole. Its name, table, key and declared columns stay: they name and shape
        the stored rows. A new time spec changes (or makes, or ends) its schedule; a new cursor
        field forgets the cursor."""
        fixed = sorted(set(changes) & FIXED)
        if fixed:
            raise InvalidArguments(
                f"{', '.join(fixed)}: cannot change (make a new source)",
                details=[
                    {"loc": ["body", k], "msg": "cannot change", "type": "value"} for k in fixed
                ],
            )
        row = await anyio.to_thread.run_sync(self._row, source_id, owner)
        current = orjson.loads(row["spec"]) | {"headers": orjson.loads(row["headers"])}
        if changes.get("cron") is not None:
            changes.setdefault("every_s", None)
        if changes.get("every_s") is not None:
            changes.setdefault("cron", None)
        spec = validated(SourceIn, current | changes, location=("body",), message="bad change")
        body = spec.model_dump(mode="json", exclude={"headers"})
        schedule_id = await self._reschedule(row, spec, owner=owner)
        forget_cursor = (current.get("cursor") or {}).get("field") != (
            spec.cursor.field if spec.cursor else None
        )
        # the same body would give other rows: its pages are read again on the next run
        forget_pages = (current.get("records_path"), current.get("columns")) != (
            body.get("records_path"),
            body.get("columns"),
        )

        def write() -> None:
            with self.engine.begin() as conn:
                conn.execute(
                    self.sources.update()
                    .where(self.sources.c.id == source_id)
                    .values(
                        spec=orjson.dumps(body).decode(),
                        headers=orjson.dumps(spec.headers).decode(),
                        schedule_id=schedule_id,
                    )
                )
                if forget_cursor:
                    self.target(row).forget_cursor(conn, source_id)
                if forget_pages:
                    self.target(row).forget_pages(conn, source_id)

        await anyio.to_thread.run_sync(write)
        return await self.get(source_id, owner=owner)

    async def _reschedule(self, row: dict[str, Any], spec: SourceIn, *, owner: str) -> str | None:
        """The source's schedule after a change: changed, made, or deleted (its id or None)."""
        timing = {"every_s": spec.every_s, "cron": spec.cron, "timezone": spec.timezone}
        schedule_id: str | None = row["schedule_id"]
        if spec.every_s is None and spec.cron is None:
            if schedule_id is not None:
                with contextlib.suppress(ScheduleNotFound):
                    await self.yard.schedules.delete(schedule_id, owner=owner)
            return None
        if schedule_id is not None:
            try:
                await self.yard.schedules.update(schedule_id, timing, owner=owner)
                return schedule_id
            except ScheduleNotFound:
                pass
        fields = {"task": TASK, "args": {"source_id": row["id"]}, **timing}
        schedule = await self.yard.schedules.create(f"ingest:{row['name']}", fields, owner=owner)
        return schedule.id

    def _set_schedule(self, source_id: str, schedule_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                self.sources.update()
                .where(self.sources.c.id == source_id)
                .values(schedule_id=schedule_id)
            )

    def _delete_row(self, source_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.sources.delete().where(self.sources.c.id == source_id))

    def _row(self, source_id: str, owner: str | None) -> dict[str, Any]:
        query = sa.select(self.sources).where(self.sources.c.id == source_id)
        if owner is not None:
            query = query.where(self.sources.c.owner == owner)
        with self.engine.connect() as conn:
            found = conn.execute(query).mappings().first()
        if found is None:
            raise SourceNotFound(f"no source with id {source_id}")
        return dict(found)

    async def get(self, source_id: str, *, owner: str | None) -> dict[str, Any]:
        return _shown(await anyio.to_thread.run_sync(self._row, source_id, owner))

    async def list_sources(self, *, owner: str | None) -> list[dict[str, Any]]:
        """The sources (None: every tenant's), oldest first."""

        def read() -> list[dict[str, Any]]:
            query = sa.select(self.sources).order_by(self.sources.c.created_at)
            if owner is not None:
                query = query.where(self.sources.c.owner == owner)
            with self.engine.connect() as conn:
                return [dict(r) for r in conn.execute(query).mappings()]

        return [_shown(row) for row in await anyio.to_thread.run_sync(read)]

    async def delete(self, source_id: str, *, owner: str) -> None:
        """Forget a source, its schedule, its table and its cursor."""
        row = await anyio.to_thread.run_sync(self._row, source_id, owner)
        if row["schedule_id"] is not None:
            try:
                await self.yard.schedules.delete(row["schedule_id"], owner=owner)
            except ScheduleNotFound:
                pass

        def drop() -> None:
            target = self.target(row)
            target.drop()
            with self.engine.begin() as conn:
                for kept in (target.state, target.pages):
                    kept.create(conn, checkfirst=True)
                    conn.execute(kept.delete().where(kept.c.source_id == source_id))
                conn.execute(self.runs_kept.delete().where(self.runs_kept.c.source_id == source_id))
                conn.execute(self.sources.delete().where(self.sources.c.id == source_id))
            self.targets.pop(source_id, None)

        await anyio.to_thread.run_sync(drop)

    async def start_run(self, source_id: str, *, owner: str | None) -> TaskRecord:
        """Submit a run now, as the source's tenant (``owner`` None: any tenant's source)."""
        row = await anyio.to_thread.run_sync(self._row, source_id, owner)
        record, _ = await self.yard.submit(TASK, {"source_id": source_id}, owner=row["owner"])
        return record

    def target(self, row: dict[str, Any]) -> Target:
        target = self.targets.get(row["id"])
        if target is None:
            spec = orjson.loads(row["spec"])
            target = Target(
                self.engine, row["table_name"], spec["primary_key"], spec.get("columns")
            )
            self.targets[row["id"]] = target
        return target

    async def rows(
        self, source_id: str, *, owner: str | None, after: int, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        row = await anyio.to_thread.run_sync(self._row, source_id, owner)
        target = self.target(row)
        found = await anyio.to_thread.run_sync(lambda: target.rows(after=after, limit=limit + 1))
        page = found[:limit]
        next_cursor = str(page[-1][0]) if len(found) > limit else None
        return [record for _, record in page], next_cursor

    async def runs(self, source_id: str, *, owner: str | None, limit: int) -> list[TaskRecord]:
        """The source's latest runs (tasks), newest first; those retention deleted are gone."""
        row = await anyio.to_thread.run_sync(self._row, source_id, owner)
        kept = self.runs_kept

        def read() -> list[str]:
            query = (
                sa.select(kept.c.task_id)
                .where(kept.c.source_id == source_id)
                .order_by(kept.c.started_at.desc())
                .limit(limit)
            )
            with self.engine.connect() as conn:
                return [task_id for (task_id,) in conn.execute(query)]

        found = []
        for task_id in await anyio.to_thread.run_sync(read):
            try:
                found.append(await self.yard.get(task_id, owner=row["owner"]))
            except TaskNotFound:
                continue
        return found

    async def latest_runs(
        self, source_ids: list[str], *, owner: str | None
    ) -> dict[str, TaskRecord]:
        """Each source's latest run, read for all of them at once (a source without one, or
        whose latest run retention deleted, is left out)."""
        kept = self.runs_kept

        def read() -> list[tuple[str, str]]:
            latest = (
                sa.select(kept.c.source_id, sa.func.max(kept.c.started_at).label("at"))
                .where(kept.c.source_id.in_(source_ids))
                .group_by(kept.c.source_id)
                .subquery()
            )
            query = sa.select(kept.c.source_id, kept.c.task_id).join(
                latest,
                (kept.c.source_id == latest.c.source_id) & (kept.c.started_at == latest.c.at),
            )
            with self.engine.connect() as conn:
                return [(source_id, task_id) for source_id, task_id in conn.execute(query)]

        found: dict[str, TaskRecord] = {}
        for source_id, task_id in await anyio.to_thread.run_sync(read):
            with contextlib.suppress(TaskNotFound):
                found[source_id] = await self.yard.get(task_id, owner=owner)
        return found

    def _started(self, source_id: str, task_id: str) -> None:
        """Keep this run among the source's latest (an attempt again: its time moves)."""
        kept = self.runs_kept
        with self.engine.begin() as conn:
            mine = (kept.c.source_id == source_id) & (kept.c.task_id == task_id)
            conn.execute(kept.delete().where(mine))
            conn.execute(
                kept.insert().values(source_id=source_id, task_id=task_id, started_at=time.time())
            )
            older = (
                sa.select(kept.c.started_at)
                .where(kept.c.source_id == source_id)
                .order_by(kept.c.started_at.desc())
                .offset(MAX_RUNS_KEPT)
                .limit(1)
                .scalar_subquery()
            )
            conn.execute(
                kept.delete().where(kept.c.source_id == source_id, kept.c.started_at <= older)
            )

    # one run --------------------------------------------------------------------------------

    async def run(self, ctx: TaskContext, source_id: str) -> dict[str, Any]:
        row = await anyio.to_thread.run_sync(self._row, source_id, None)
        await anyio.to_thread.run_sync(self._started, source_id, ctx.task_id)
        spec = orjson.loads(row["spec"])
        headers: dict[str, str] = orjson.loads(row["headers"])
        target = self.target(row)
        cursor_spec = spec.get("cursor")
        cursor_before = await anyio.to_thread.run_sync(target.cursor, source_id)
        params = dict(spec["params"])
        if cursor_spec is not None and cursor_before is not None:
            params[cursor_spec["param"]] = _looked_back(cursor_before, cursor_spec["lookback_s"])
        limits = Limits(
            max_pages=spec["max_pages"],
            max_response_bytes=spec["max_response_bytes"],
            timeout_s=spec["timeout_s"],
            rate_per_s=spec["rate_per_s"],
        )
        stats = FetchStats()
        totals = {"inserted": 0, "updated": 0, "unchanged": 0}
        rejects: list[dict[str, Any]] = []
        rejected = same_pages = 0
        # without an incremental cursor, a page whose body is the one last written is counted
        # unchanged, and with a pagination that allows it, not even parsed (fetch.BLIND)
        written: dict[int, tuple[str, int, int]] = {}
        if cursor_spec is None:
            written = await anyio.to_thread.run_sync(target.known_pages, source_id)
        async with self.client(spec["timeout_s"]) as client:
            try:
                async for page in pages(
                    client,
                    spec["url"],
                    params=params,
                    headers=headers,
                    records_path=spec["records_path"],
                    pagination=Pagination(**spec["pagination"]),
                    limits=limits,
                    stats=stats,
                    known={n: (digest, k + r) for n, (digest, k, r) in written.items()},
                ):
                    ctx.raise_if_cancelled()
                    if page.known:
                        outcome = target.known_outcome(*written[page.number][1:])
                    else:
                        write = functools.partial(
                            target.write_page,
                            page.records,
                            source_id=source_id,
                            cursor_field=cursor_spec["field"] if cursor_spec else None,
                            page=page.number,
                            digest=page.digest,
                        )
                        outcome = await anyio.to_thread.run_sync(write)
                    totals["inserted"] += outcome.inserted
                    totals["updated"] += outcome.updated
                    totals["unchanged"] += outcome.unchanged
                    same_pages += outcome.same_page
                    rejected += len(outcome.rejected)
                    room = MAX_REJECTS - len(rejects)
                    rejects += [r for r in outcome.rejected if r][: max(room, 0)]
                    rows = sum(totals.values())
                    ctx.progress(  # not awaited: a run does not wait for the coalesced write
                        min(99.0, 100.0 * page.number / limits.max_pages),
                        f"{page.number} pages, {rows} rows",
                    )
            except FetchError as exc:
                raise IngestFailed(str(exc)) from None
        cursor_after = await anyio.to_thread.run_sync(target.finish_run, source_id)
        tally = self.yard.tally
        tally.count("conveyor_ingest_pages", {}, stats.pages)
        for kind, n in (*totals.items(), ("rejected", rejected)):
            tally.count("conveyor_ingest_rows", {"outcome": kind}, n)
        return {
            "source_id": source_id,
            "table": row["table_name"],
            "pages": stats.pages,
            "pages_unchanged": same_pages,
            "rows_inserted": totals["inserted"],
            "rows_updated": totals["updated"],
            "rows_unchanged": totals["unchanged"],
            "rows_rejected": rejected,
            "rejects": rejects,
            "bytes": stats.bytes,
            "retries": stats.retries,
            "truncated": stats.truncated,
            "cursor_before": cursor_before,
            "cursor_after": cursor_after,
        }


class IngestFailed(Exception):
    """A run that could not go on (the server's answer, the limits, the guard)."""


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _looked_back(value: Any, lookback_s: float) -> str:
    """The cursor to send: ``value`` less ``lookback_s`` (numbers, ISO-8601 times)."""
    if not lookback_s:
        return str(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value - lookback_s)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        earlier = (moment - timedelta(seconds=lookback_s)).isoformat()
        return earlier.replace("+00:00", "Z") if value.endswith("Z") else earlier
    return str(value)


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A source as the API shows it: header names only, never their values."""
    spec = orjson.loads(row["spec"])
    headers = orjson.loads(row["headers"])
    return {
        "id": row["id"],
        **{k: v for k, v in spec.items() if k not in ("name", "table")},
        "name": row["name"],
        "headers": sorted(headers),
        "table": row["table_name"],
        "schedule_id": row["schedule_id"],
        "created_at": row["created_at"],
        "links": {
            "self": f"/ingest/sources/{row['id']}",
            "run": f"/ingest/sources/{row['id']}/run",
            "rows": f"/ingest/sources/{row['id']}/rows",
            "runs": f"/ingest/sources/{row['id']}/runs",
        },
    }


def register_ingest_tasks(yard: "Conveyor") -> Ingestion:
    """Register ``ingest.run`` (internal: submitted by the routes and the sources' schedules)."""
    service = Ingestion(yard)

    async def ingest_run(ctx: TaskContext, source_id: str) -> dict[str, Any]:
        """Fetch the source's pages and upsert their records (one transaction per page)."""
        return await service.run(ctx, source_id)

    # a run lost with its worker is run again (its pages are upserts); a run the API refused is
    # not retried here: the fetcher already retried what a retry can fix
    yard.task(
        name=TASK,
        public=False,
        timeout_s=3600,
        retries=2,
        retry_on=(sa.exc.OperationalError,),
        concurrency=4,
        idempotent=True,
    )(ingest_run)
    _SERVICES[yard] = service
    return service


__all__ = ["Ingestion", "InvalidArguments", "register_ingest_tasks"]
