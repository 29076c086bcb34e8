"""The PostgreSQL store: task records shared by an API and workers on any number of machines.

asyncpg with a connection pool. Times that decide leases and due dates come from the database's
clock (``clock_timestamp()``), so workers on hosts with skewed clocks agree. Claims take rows with
``FOR UPDATE SKIP LOCKED``; a per-type concurrency limit is checked under a transaction-scoped
advisory lock on the type's name, so the limit holds across every worker. A trigger sends
``NOTIFY conveyor_tasks, '<id>'`` when a task's state, progress or cancel request changes; the
store listens and tells its subscribers, so event streams do not poll.

``published_at`` serves the Celery engine: when the task's broker message was last sent. The
sweeper (:meth:`PostgresStore.due_for_publish`) re-sends messages for queued tasks that are due
and were never published since they became due, or whose message looks lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg

from ..errors import QueueFull, StoreUnavailable, TaskNotFound, TaskStateConflict
from ..record import TaskRecord
from ..status import RETRYABLE, TERMINAL, TaskStatus
from .rows import COLUMNS, WORKER_LOST, dump, list_query, record_from_row

logger = logging.getLogger("conveyor.store")

SCHEMA_VERSION = 3
CHANNEL = "conveyor_tasks"  # a task's state, progress or message changed: id
_NOW = "extract(epoch from clock_timestamp())::float8"
_LOCK_MIGRATE = 7_436_021  # advisory lock held while the schema is created or migrated
# Queued tasks whose message is still to be sent (new, delayed, retried): what the sweeper reads
# several times a second, without scanning the tasks whose message is already on its way.
_UNPUBLISHED = "status = 'queued' AND (published_at IS NULL OR published_at < run_at)"
_UNPUBLISHED_INDEX = (
    f"CREATE INDEX IF NOT EXISTS conveyor_tasks_unpublished ON conveyor_tasks (run_at) "
    f"WHERE {_UNPUBLISHED};"
)

# PostgreSQL (before 19) wakes every backend that LISTENs in the database for every NOTIFY,
# whatever its channel: measured, each listening connection costs the server about 40 µs of CPU
# per task state change. Only processes with a client waiting listen; workers learn of cancel
# requests through their heartbeat (at most a second), as they do with the SQLite store.
_NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION conveyor_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS conveyor_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conveyor_tasks (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    args TEXT NOT NULL,
    result TEXT,
    error TEXT,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 1,
    timeout_s DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    run_at DOUBLE PRECISION NOT NULL,
    idempotency_key TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    worker_id TEXT,
    lease_expires_at DOUBLE PRECISION,
    result_blob TEXT,
    published_at DOUBLE PRECISION,
    stolen BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS conveyor_tasks_ready ON conveyor_tasks (priority DESC, run_at, seq)
    WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS conveyor_tasks_ready_by_name
    ON conveyor_tasks (name, priority DESC, run_at, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS conveyor_tasks_running
    ON conveyor_tasks (worker_id, lease_expires_at) WHERE status = 'running';
{_UNPUBLISHED_INDEX}
CREATE INDEX IF NOT EXISTS conveyor_tasks_running_name ON conveyor_tasks (name)
    WHERE status = 'running';
CREATE UNIQUE INDEX IF NOT EXISTS conveyor_tasks_idempotency
    ON conveyor_tasks (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS conveyor_tasks_owner_seq ON conveyor_tasks (owner, seq);
CREATE INDEX IF NOT EXISTS conveyor_tasks_status_seq ON conveyor_tasks (status, seq);
{_NOTIFY_FUNCTION}
DROP TRIGGER IF EXISTS conveyor_tasks_changed ON conveyor_tasks;
CREATE TRIGGER conveyor_tasks_changed
    AFTER DELETE OR UPDATE OF status, progress, message, cancel_requested
    ON conveyor_tasks FOR EACH ROW EXECUTE FUNCTION conveyor_notify();
"""
# Each step takes a store from the version before it to its own; a new store gets _SCHEMA.
_MIGRATIONS: dict[int, str] = {2: _UNPUBLISHED_INDEX, 3: _NOTIFY_FUNCTION}


# A task still held by the worker that claimed it (this attempt), its id, worker and attempt in
# the given parameters. IS NOT DISTINCT FROM leaves the id as the only condition an index can
# serve: with ``=``, a generic plan made before the table's first ANALYZE scans the worker's
# running tasks (conveyor_tasks_running) instead (measured: 0.59 ms with 4,000, against 0.02).
def _held(task: int, worker: int, attempt: int) -> str:
    return (
        f"id = ${task} AND (status, worker_id, attempts) "
        f"IS NOT DISTINCT FROM ('running', ${worker}, ${attempt})"
    )


def _outcome(first: int) -> str:
    """An attempt's outcome, from 7 parameters numbered from ``first``: status, result,
    result_blob, error, then the held task (id, worker, attempt)."""
    status, result, blob, error = (f"${n}" for n in range(first, first + 4))
    return (
        f"SET status = {status}, result = {result}, result_blob = {blob}, error = {error}, "
        f"finished_at = {_NOW}, lease_expires_at = NULL, "
        f"progress = CASE WHEN {status} = 'completed' THEN 100 ELSE progress END "
        f"WHERE {_held(first + 4, first + 5, first + 6)}"
    )


_FINISH = f"UPDATE conveyor_tasks {_outcome(1)}"
_NO_OUTCOME = (None,) * 7
_OUTCOME_TASK = 4  # where an outcome's parameters (see _outcome) hold the task id
# An outcome waits this long for the next claim of its process, to travel in the same statement
# (measured per task: 290-300 → 190-200 µs of PostgreSQL CPU, 100-110 → 50-55 µs of the
# worker's); then it is written on its own.
_OUTCOME_HOLD_S = 0.005

# One statement. ``named``: whether the named task is claimable, or was taken by a
# message that named another task (``stolen``: this message then stands in for that
# one). ``target``: the best queued task of the type. ``claimed``: it, now running; if it
# still has a message in flight, that message becomes a stand-in (``stolen``).
_CLAIM_ONE = (
    f"WITH named AS (SELECT status = 'queued' AND run_at <= {_NOW} AS due, "
    "status <> 'queued' AND stolen AS stand_in FROM conveyor_tasks WHERE id = $1), "
    "target AS (SELECT id, published_at FROM conveyor_tasks WHERE status = 'queued' "
    f"AND name = $2 AND run_at <= {_NOW} "
    "AND ((SELECT due FROM named) OR (SELECT stand_in FROM named)) "
    "ORDER BY priority DESC, run_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED), "
    "claimed AS (UPDATE conveyor_tasks t SET status = 'running', "
    f"attempts = attempts + 1, worker_id = $3, lease_expires_at = {_NOW} + $4, "
    f"started_at = {_NOW}, progress = 0, message = NULL, "
    "stolen = (t.id <> $1 AND target.published_at IS NOT NULL) FROM target "
    f"WHERE t.id = target.id RETURNING {', '.join('t.' + c for c in COLUMNS.split(', '))}, "
    "target.published_at IS NULL AS no_message), "
    "used AS (UPDATE conveyor_tasks SET stolen = FALSE WHERE id = $1 "
    "AND (SELECT stand_in FROM named) AND EXISTS (SELECT 1 FROM claimed)), "
    # an outcome of this process that was waiting (``_OUTCOME_HOLD_S``), or none ($9 NULL)
    f"done AS (UPDATE conveyor_tasks {_outcome(5)} RETURNING id) "
    "SELECT claimed.*, (SELECT due FROM named) AS due, (SELECT id FROM done) AS done "
    "FROM (SELECT 1) one LEFT JOIN claimed ON TRUE"
)
_QUEUED_RECOUNT_S = 0.25
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    TimeoutError,
)


class PostgresStore:
    """Task records in PostgreSQL, shared by every process of a deployment."""

    def __init__(self, dsn: str, *, pool_size: int = 10, connect_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._subscribers: list[Callable[[str], None]] = []
        self._queued_count = 0
        self._queued_counted_at = 0.0
        self._background: set[asyncio.Future[None]] = set()
        self._pending_inserts: list[
            tuple[TaskRecord, str, asyncio.Future[tuple[TaskRecord, bool]]]
        ] = []
        self._pinned: dict[str, asyncpg.Connection] = {}  # see _hot
        # outcomes waiting for this process's next claim (see finish), oldest first
        self._held: list[tuple[tuple[Any, ...], asyncio.Future[bool]]] = []
        self._held_timer: asyncio.TimerHandle | None = None

    # lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout_s,
                command_timeout=60,
                reset=_keep_session,
                # The claim reads the queue index in the order it asks for and stops at the first
                # free task. A bitmap scan reads every matching row first: after a plain VACUUM of
                # a backlog (rows counted, no column statistics), the planner took one for each
                # claim and sorted every queued task (50-100 ms a claim with 60,000 queued, 0.6 ms
                # without). The cost: a listing filtered on two columns uses one of their indexes.
                server_settings={"enable_bitmapscan": "off"},
            )
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot open the PostgreSQL store: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await _migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        self._release_held()
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.gather(self._listen_task, return_exceptions=True)
            self._listen_task = None
        pinned, self._pinned = self._pinned, {}
        for conn in pinned.values():
            if self._pool is not None:
                await self._pool.release(conn)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(task_id)`` when any process changes a task's state or progress
        (``""``: notifications may have been missed while reconnecting).

        A process LISTENs only from its first subscriber on (something waits on a task): a worker
        that nobody waits on is not woken by every change of every task."""
        self._subscribers.append(callback)
        if self._listen_task is None:
            self._listen_task = asyncio.create_task(self._listen_loop(), name="conveyor-pg-listen")

    async def _listen_loop(self) -> None:
        """Hold a LISTEN connection; reconnect after the database restarts."""
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self._connect_timeout_s)
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                logger.debug("LISTEN connection failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await conn.add_listener(CHANNEL, self._on_notify)
                while not lost.is_set():  # a dead socket is noticed on the next query
                    try:
                        await asyncio.wait_for(lost.wait(), 1.0)
                    except TimeoutError:
                        await conn.execute("SELECT 1")
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
                pass
            finally:
                if not conn.is_closed():
                    conn.terminate()
            for callback in self._subscribers:  # re-read what was missed
                callback("")

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        for callback in self._subscribers:
            callback(str(payload))

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        with _unavailable_on_failure():
            async with self._pool.acquire(timeout=self._connect_timeout_s) as conn:
                yield conn

    @asynccontextmanager
    async def _hot(self, lane: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection kept out of the pool for one hot statement (a claim, an outcome): the
        pool's acquire and release cost as much client CPU as the statement itself (measured:
        93-133 µs against 52 µs a call). The lane's connection is taken while in use, so a
        concurrent caller acquires one of its own; one connection per lane is kept afterwards,
        and one that failed (or was cancelled mid-statement) goes back to the pool."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        conn = self._pinned.pop(lane, None)
        try:
            with _unavailable_on_failure():
                if conn is None or conn.is_closed():
                    conn = await self._pool.acquire(timeout=self._connect_timeout_s)
                yield conn
        except BaseException:
            if conn is not None:  # the pool waits out a cancelled query, or replaces the link
                await asyncio.shield(self._pool.release(conn))
            raise
        if lane in self._pinned:  # a concurrent caller kept its own meanwhile
            await self._pool.release(conn)
        else:
            self._pinned[lane] = conn

    # writes ------------------------------------------------------------------------------------

    async def insert(
        self, record: TaskRecord, *, args_json: str, max_queued: int | None
    ) -> tuple[TaskRecord, bool]:
        if record.idempotency_key is None:  # grouped with the other inserts of this loop turn
            future: asyncio.Future[tuple[TaskRecord, bool]] = (
                asyncio.get_running_loop().create_future()
            )
            if not self._pending_inserts:
                asyncio.get_running_loop().call_soon(self._flush_inserts, max_queued)
            self._pending_inserts.append((record, args_json, future))
            return await future
        async with self._conn() as conn:
            existing = await _by_key(conn, record)
            if existing is not None:
                return existing, False
            if max_queued is not None and await self._queued(conn) >= max_queued:
                raise QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)
            seq = await conn.fetchval(
                "INSERT INTO conveyor_tasks (id, name, owner, status, priority, args, attempts, "
                "max_attempts, timeout_s, created_at, run_at, idempotency_key, published_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $10, $11, "
                "CASE WHEN $10::float8 <= $9::float8 THEN $9::float8 END) "
                "ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL "
                "DO NOTHING RETURNING seq",
                record.id,
                record.name,
                record.owner,
                record.status.value,
                record.priority,
                args_json,
                record.max_attempts,
                record.timeout_s,
                record.created_at,
                record.run_at,
                record.idempotency_key,
            )
            if seq is None:  # a concurrent submission with the same key won
                winner = await _by_key(conn, record)
                assert winner is not None
                return winner, False
        record.seq = seq
        self._queued_count += 1
        return record, True

    def _flush_inserts(self, max_queued: int | None) -> None:
        batch, self._pending_inserts = self._pending_inserts, []
        self._spawn(self._insert_batch(batch, max_queued))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background; ``close`` waits for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _insert_batch(
        self,
        batch: list[tuple[TaskRecord, str, asyncio.Future[tuple[TaskRecord, bool]]]],
        max_queued: int | None,
    ) -> None:
        """One statement for every insert made during one turn of the event loop; each caller
        resumes once the rows are committed."""
        try:
            async with self._conn() as conn:
                if max_queued is not None:
                    room = max(max_queued - await self._queued(conn), 0)
                    for _, _, refused in batch[room:]:
                        refused.set_exception(
                            QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)
                        )
                    batch = batch[:room]
                if not batch:
                    return
                records = [record for record, _, _ in batch]
                rows = await conn.fetch(
                    "INSERT INTO conveyor_tasks (id, name, owner, status, priority, args, "
                    "max_attempts, timeout_s, created_at, run_at, published_at) "
                    "SELECT i, n, o, s, p, a, m, t, c, r, CASE WHEN r <= c THEN c END FROM unnest("
                    "$1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], "
                    "$7::int[], $8::float8[], $9::float8[], $10::float8[]) "
                    "AS u(i, n, o, s, p, a, m, t, c, r) RETURNING id, seq",
                    [r.id for r in records],
                    [r.name for r in records],
                    [r.owner for r in records],
                    [r.status.value for r in records],
                    [r.priority for r in records],
                    [args for _, args, _ in batch],
                    [r.max_attempts for r in records],
                    [r.timeout_s for r in records],
                    [r.created_at for r in records],
                    [r.run_at for r in records],
                )
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        seqs = {row[0]: row[1] for row in rows}
        self._queued_count += len(rows)
        for record, _, future in batch:
            record.seq = seqs[record.id]
            if not future.done():
                future.set_result((record, True))

    async def _queued(self, conn: asyncpg.Connection) -> int:
        # Counted at most every _QUEUED_RECOUNT_S: the bound is approximate by that much.
        now = time.monotonic()
        if now - self._queued_counted_at > _QUEUED_RECOUNT_S:
            self._queued_count = await conn.fetchval(
                "SELECT count(*) FROM conveyor_tasks WHERE status = 'queued'"
            )
            self._queued_counted_at = now
        return self._queued_count

    async def claim(
        self,
        *,
        worker_id: str,
        names: Collection[str],
        limits: Mapping[str, int],
        n: int,
        lease_s: float,
    ) -> list[TaskRecord]:
        async with self._conn() as conn, conn.transaction():
            remaining = await _remaining(conn, limits)
            eligible = [name for name in names if remaining.get(name, 1) > 0]
            if not eligible:
                return []
            rows = await conn.fetch(
                f"SELECT id, name FROM conveyor_tasks WHERE status = 'queued' AND run_at <= {_NOW} "
                "AND name = ANY($1::text[]) ORDER BY priority DESC, run_at, seq LIMIT $2 "
                "FOR UPDATE SKIP LOCKED",
                eligible,
                n * 4 if remaining else n,
            )
            chosen: list[str] = []
            for task_id, name in rows:
                if name in remaining:
                    if remaining[name] <= 0:
                        continue
                    remaining[name] -= 1
                chosen.append(task_id)
                if len(chosen) == n:
                    break
            if not chosen:
                return []
            claimed = await conn.fetch(
                f"UPDATE conveyor_tasks SET status = 'running', attempts = attempts + 1, "
                f"worker_id = $1, lease_expires_at = {_NOW} + $2, started_at = {_NOW}, "
                f"progress = 0, message = NULL WHERE id = ANY($3::text[]) RETURNING {COLUMNS}",
                worker_id,
                lease_s,
                chosen,
            )
        self._queued_count -= len(claimed)
        order = {task_id: i for i, task_id in enumerate(chosen)}
        return sorted((record_from_row(row) for row in claimed), key=lambda r: order[r.id])

    async def claim_one(
        self, task_id: str, *, name: str, worker_id: str, limit: int | None, lease_s: float
    ) -> TaskRecord | None:
        """Claim for the task a message names; None when the message is to be dropped.

        A message stands for its type: the best queued task of that type is claimed (priority,
        then due date, then submission order), so the store's order holds whatever order
        concurrent consumers receive messages in. Usually that is the named task. When it is
        another one, whose own message is still in flight, that task is marked ``stolen`` and
        its message, when it comes, claims in turn for the type instead of being dropped: one
        message, one claim, and no task left without a message.

        Otherwise the message is dropped: its task is finished, cancelled, running elsewhere, or
        not yet due (a retry waiting for its backoff). A type with a concurrency ``limit`` is
        claimed under the type's lock, within the limit, across every worker. When the named
        task stays queued with no message (no room for its type), its ``published_at`` is
        cleared and the sweeper sends it again.
        """
        if limit is None:
            held = self._take_held(task_id)
        else:  # the type's room counts running tasks: what ended is written first
            held = None
            await self._write_held()
        args = (task_id, name, worker_id, lease_s, *(held[0] if held else _NO_OUTCOME))
        try:
            async with self._hot("claim") as conn:
                if limit is None:  # one round trip
                    found = await conn.fetchrow(_CLAIM_ONE, *args)
                else:
                    async with conn.transaction():
                        room = (await _remaining(conn, {name: limit}))[name] > 0
                        found = await conn.fetchrow(_CLAIM_ONE, *args) if room else None
        except BaseException:
            if held is not None:  # whether it was written is unknown: write it on its own
                self._spawn(self._write_outcome(*held))
            raise
        if held is not None and not held[1].done():
            held[1].set_result(found is not None and found["done"] is not None)
        row = None if found is None or found[1] is None else found
        # The named task stays queued without a message: when nothing was claimed, or when the
        # task taken instead had no message of its own left to stand in for it.
        if (found is None or found["due"]) and (
            row is None or (row[1] != task_id and row["no_message"])
        ):
            # after the commit (no lock of ours is held), and without delaying the claimed task
            self._spawn(self._unpublish_quietly(task_id))
        if row is None:
            return None
        self._queued_count -= 1
        return record_from_row(row)

    async def due_for_publish(
        self, *, stale_s: float | None, limits: Mapping[str, int], n: int = 1000
    ) -> list[tuple[str, str, int]]:
        """``(id, name, priority)`` of queued, due tasks whose broker message must be sent:
        never sent since they became due, or (when ``stale_s`` is given) sent more than
        ``stale_s`` ago; types at their concurrency limit wait. Marks them sent."""
        unsent = _UNPUBLISHED
        if stale_s is not None:  # this one reads every queued task: the caller runs it rarely
            stale = f"status = 'queued' AND published_at < {_NOW} - {float(stale_s)!r}"
            unsent = f"({_UNPUBLISHED}) OR ({stale})"
        async with self._conn() as conn, conn.transaction():
            remaining = await _remaining(conn, limits)
            saturated = [name for name, left in remaining.items() if left <= 0]
            rows = await conn.fetch(
                f"UPDATE conveyor_tasks t SET published_at = {_NOW} FROM ("
                f"SELECT id FROM conveyor_tasks WHERE ({unsent}) AND run_at <= {_NOW} "
                "AND NOT (name = ANY($1::text[])) "
                "ORDER BY priority DESC, run_at, seq LIMIT $2 FOR UPDATE SKIP LOCKED) due "
                "WHERE t.id = due.id RETURNING t.id, t.name, t.priority",
                saturated,
                n,
            )
        return [(row[0], row[1], row[2]) for row in rows]

    async def _unpublish_quietly(self, task_id: str) -> None:
        try:
            await self.mark_unpublished(task_id)
        except StoreUnavailable as exc:  # the stale-message sweep sends it later
            logger.warning("task %s waits for the stale-message sweep: %s", task_id, exc)

    async def mark_unpublished(self, task_id: str) -> None:
        """Its message could not be sent: the next sweep sends it."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE conveyor_tasks SET published_at = NULL WHERE id = $1 AND status = 'queued'",
                task_id,
            )

    async def set_progress(
        self, task_id: str, worker_id: str, attempt: int, progress: float, message: str | None
    ) -> bool:
        async with self._conn() as conn:
            status = await conn.execute(
                f"UPDATE conveyor_tasks SET progress = $1, message = $2 WHERE {_held(3, 4, 5)}",
                progress,
                message,
                task_id,
                worker_id,
                attempt,
            )
        return bool(status == "UPDATE 1")

    async def finish(
        self,
        task_id: str,
        worker_id: str,
        attempt: int,
        *,
        status: TaskStatus,
        result_json: str | None = None,
        blob_json: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Record an outcome: with this process's next claim, in the same statement, when one
        comes within ``_OUTCOME_HOLD_S``, otherwise on its own; returns once it is committed.

        A pool process runs one task at a time and takes its next message as soon as the task
        has run, so the outcome of one task usually travels with the claim of the next."""
        outcome = (status.value, result_json, blob_json, dump(error), task_id, worker_id, attempt)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._held.append((outcome, future))
        if self._held_timer is None:
            self._held_timer = loop.call_later(_OUTCOME_HOLD_S, self._release_held)
        return await future  # cancelling the caller does not withdraw the outcome

    def _take_held(self, task_id: str) -> tuple[tuple[Any, ...], asyncio.Future[bool]] | None:
        """The oldest held outcome, to go with the claim for ``task_id``'s message (none for
        the message of the held task itself: one statement must not update a row twice)."""
        if not self._held or self._held[0][0][_OUTCOME_TASK] == task_id:
            return None
        held = self._held.pop(0)
        if not self._held and self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        return held

    def _release_held(self) -> None:
        """Write every held outcome now, each on its own."""
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, []
        for outcome, future in held:
            self._spawn(self._write_outcome(outcome, future))

    async def _write_held(self) -> None:
        if self._held:
            futures = [future for _, future in self._held]
            self._release_held()
            await asyncio.wait(futures)

    async def _write_outcome(self, outcome: tuple[Any, ...], future: asyncio.Future[bool]) -> None:
        try:
            async with self._hot("finish") as conn:
                written = await conn.execute(_FINISH, *outcome)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(written == "UPDATE 1")

    async def requeue(
        self,
        task_id: str,
        worker_id: str,
        attempt: int,
        *,
        run_at: float,
        error: dict[str, Any] | None,
        refund_attempt: bool,
    ) -> TaskRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "UPDATE conveyor_tasks SET status = 'queued', run_at = $1, error = $2, "
                "worker_id = NULL, lease_expires_at = NULL, attempts = attempts - $3 "
                f"WHERE {_held(4, 5, 6)} RETURNING {COLUMNS}",
                run_at,
                dump(error),
                int(refund_attempt),
                task_id,
                worker_id,
                attempt,
            )
        if row is None:
            return None
        self._queued_count += 1
        return record_from_row(row)

    async def heartbeat(self, worker_id: str, lease_s: float) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"UPDATE conveyor_tasks SET lease_expires_at = {_NOW} + $1 "
                "WHERE status = 'running' AND worker_id = $2 RETURNING id, cancel_requested",
                lease_s,
                worker_id,
            )
        return [row[0] for row in rows if row[1]]

    async def recover_expired(self) -> list[TaskRecord]:
        lost = dump(WORKER_LOST)
        expired = f"status = 'running' AND lease_expires_at < {_NOW}"
        async with self._conn() as conn, conn.transaction():
            rows = await conn.fetch(
                f"UPDATE conveyor_tasks SET status = 'cancelled', finished_at = {_NOW}, "
                f"lease_expires_at = NULL WHERE {expired} AND cancel_requested "
                f"RETURNING {COLUMNS}"
            )
            rows += await conn.fetch(
                f"UPDATE conveyor_tasks SET status = 'queued', run_at = {_NOW}, error = $1, "
                "worker_id = NULL, lease_expires_at = NULL "
                f"WHERE {expired} AND attempts < max_attempts RETURNING {COLUMNS}",
                lost,
            )
            rows += await conn.fetch(
                f"UPDATE conveyor_tasks SET status = 'failed', error = $1, finished_at = {_NOW}, "
                f"lease_expires_at = NULL WHERE {expired} RETURNING {COLUMNS}",
                lost,
            )
        return [record_from_row(row) for row in rows]

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord:
        async with self._conn() as conn, conn.transaction():
            current = await _fetch(conn, task_id, owner, lock=True)
            if current.status is TaskStatus.QUEUED:
                sql = f"status = 'cancelled', finished_at = {_NOW}"
                self._queued_count -= 1
            elif current.status is TaskStatus.RUNNING:
                sql = "cancel_requested = TRUE"
            else:
                raise TaskStateConflict(
                    f"task {task_id} is already {current.status.value}; it cannot be cancelled"
                )
            row = await conn.fetchrow(
                f"UPDATE conveyor_tasks SET {sql} WHERE id = $1 RETURNING {COLUMNS}", task_id
            )
        return record_from_row(row)

    async def retry(self, task_id: str, *, owner: str | None, attempts: int) -> TaskRecord:
        async with self._conn() as conn, conn.transaction():
            current = await _fetch(conn, task_id, owner, lock=True)
            if current.status not in RETRYABLE:
                raise TaskStateConflict(
                    f"task {task_id} is {current.status.value}; only failed or cancelled tasks "
                    "can be retried"
                )
            row = await conn.fetchrow(
                "UPDATE conveyor_tasks SET status = 'queued', max_attempts = attempts + $1, "
                f"run_at = {_NOW}, result = NULL, result_blob = NULL, error = NULL, "
                "progress = 0, message = NULL, started_at = NULL, finished_at = NULL, "
                f"cancel_requested = FALSE, worker_id = NULL, published_at = {_NOW} "
                f"WHERE id = $2 RETURNING {COLUMNS}",
                attempts,
                task_id,
            )
        self._queued_count += 1
        return record_from_row(row)

    async def delete(self, task_id: str, *, owner: str | None) -> None:
        async with self._conn() as conn, conn.transaction():
            current = await _fetch(conn, task_id, owner, lock=True)
            if current.status not in TERMINAL:
                raise TaskStateConflict(
                    f"task {task_id} is {current.status.value}; cancel it or wait until it ends"
                )
            await conn.execute("DELETE FROM conveyor_tasks WHERE id = $1", task_id)

    # reads -------------------------------------------------------------------------------------

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        async with self._conn() as conn:
            return await _fetch(conn, task_id, owner)

    async def list_tasks(
        self,
        *,
        owner: str | None,
        status: TaskStatus | None = None,
        name: str | None = None,
        limit: int = 50,
        before_seq: int | None = None,
    ) -> list[TaskRecord]:
        sql, params = list_query(
            "conveyor_tasks",
            lambda n: f"${n}",
            owner=owner,
            status=status,
            name=name,
            limit=limit,
            before_seq=before_seq,
        )
        async with self._conn() as conn:
            rows = await conn.fetch(sql, *params)
        return [record_from_row(row) for row in rows]

    async def count_by_status(self) -> dict[str, int]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT status, count(*) FROM conveyor_tasks GROUP BY status")
        return {status.value: 0 for status in TaskStatus} | {row[0]: row[1] for row in rows}


async def _by_key(conn: asyncpg.Connection, record: TaskRecord) -> TaskRecord | None:
    """The task already submitted by this owner with this idempotency key."""
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM conveyor_tasks WHERE owner = $1 AND idempotency_key = $2",
        record.owner,
        record.idempotency_key,
    )
    return None if row is None else record_from_row(row)


async def _remaining(conn: asyncpg.Connection, limits: Mapping[str, int]) -> dict[str, int]:
    """Room left under each per-type limit; locks those types until the transaction ends."""
    if not limits:
        return {}
    names = sorted(limits)
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('conveyor:' || n)) FROM unnest($1::text[]) n",
        names,
    )
    running = {
        row[0]: row[1]
        for row in await conn.fetch(
            "SELECT name, count(*) FROM conveyor_tasks WHERE status = 'running' "
            "AND name = ANY($1::text[]) GROUP BY name",
            names,
        )
    }
    return {name: limit - running.get(name, 0) for name, limit in limits.items()}


@contextmanager
def _unavailable_on_failure() -> Iterator[None]:
    """PostgreSQL unreachable or failing: ``StoreUnavailable`` (the API answers 503)."""
    try:
        yield
    except _CONNECTION_ERRORS as exc:
        raise StoreUnavailable(f"PostgreSQL is unreachable: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise StoreUnavailable(f"PostgreSQL failed: {exc}") from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's reset query (advisory unlock, ``CLOSE ALL``,
    ``UNLISTEN *``, ``RESET ALL``): a round trip per store call, for session state this store
    never leaves behind (its locks are transaction-scoped, it listens on a connection of its own,
    and sets nothing). asyncpg still rolls back a transaction left open."""


async def _fetch(
    conn: asyncpg.Connection, task_id: str, owner: str | None, *, lock: bool = False
) -> TaskRecord:
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM conveyor_tasks WHERE id = $1{' FOR UPDATE' if lock else ''}",
        task_id,
    )
    if row is None or (owner is not None and row[3] != owner):
        raise TaskNotFound(f"no task with id {task_id}")
    return record_from_row(row)


async def _migrate(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_MIGRATE)
        exists = await conn.fetchval("SELECT to_regclass('conveyor_tasks') IS NOT NULL")
        if not exists:
            await conn.execute(_SCHEMA)
            await conn.execute("INSERT INTO conveyor_schema (version) VALUES ($1)", SCHEMA_VERSION)
            return
        version = await conn.fetchval("SELECT max(version) FROM conveyor_schema") or 1
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the PostgreSQL store is at schema {version}, newer than this Conveyor "
                f"({SCHEMA_VERSION}); upgrade Conveyor"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute(_MIGRATIONS[target])
        if version < SCHEMA_VERSION:
            await conn.execute("UPDATE conveyor_schema SET version = $1", SCHEMA_VERSION)
