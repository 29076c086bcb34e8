"""The PostgreSQL store: task records shared by an API and workers on any number of machines.

asyncpg with a connection pool. Times that decide leases and due dates come from the database's
clock (``clock_timestamp()``), so workers on hosts with skewed clocks agree. Claims take rows with
``FOR UPDATE SKIP LOCKED``; a per-type concurrency limit is checked under a transaction-scoped
advisory lock on the type's name, so the limit holds across every worker. A trigger sends
``NOTIFY conveyor_tasks, '<id>'`` when a task's state, progress or cancel request changes; the
store listens and tells its subscribers, so event streams do not poll.

The schema and its migrations are in :mod:`.postgres_schema`; the Celery engine's publication
ledger, which lives in the same table, in :mod:`.postgres_ledger`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ..errors import QueueFull, StoreUnavailable, TaskNotFound
from ..rates import Rate
from ..record import TaskRecord
from ..status import TaskStatus, cancel_outcome, require_deletable, require_retryable
from .base import PublicationLedger
from .logs import PostgresLogs
from .postgres_batches import PostgresBatches
from .postgres_counts import BY_STATUS, QUEUED
from .postgres_ledger import HeldOutcome, PostgresLedger
from .postgres_schedules import PostgresSchedules
from .postgres_schema import CHANNEL, migrate
from .postgres_sql import (
    CONNECTION_ERRORS,
    FINISH,
    NOW,
    OUTCOME_HOLD_S,
    OUTCOME_TASK,
    RATE_USED,
    held,
    insert_rows,
    record_starts,
    remaining,
    unavailable_on_failure,
)
from .retention import PostgresRetention
from .rows import (
    COLUMNS,
    NO_FILTER,
    WORKER_LOST,
    TaskFilter,
    choose_claims,
    dump,
    list_query,
    record_from_row,
    recovery_statements,
    requeue_statement,
    retry_set,
    seq_range,
)
from .stats import PostgresStats
from .workers import PostgresWorkers

logger = logging.getLogger("conveyor.store")

_QUEUED_RECOUNT_S = 0.25
_RECOVERY = recovery_statements("conveyor_tasks", now=NOW, lost="$1")
_REQUEUE = requeue_statement(
    "conveyor_tasks",
    param=lambda n: f"${n}::float8" if n == 1 else f"${n}",
    now=NOW,
    held=held(4, 5, 6),
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
        self._ledger = PostgresLedger(self)
        self._batches = PostgresBatches(self)
        self._schedules = PostgresSchedules(self)

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
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot open the PostgreSQL store: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
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

    def publication_ledger(self) -> PublicationLedger:
        return self._ledger

    def batches(self) -> PostgresBatches:
        return self._batches

    def workers(self) -> PostgresWorkers:
        return PostgresWorkers(self)

    def stats(self) -> PostgresStats:
        return PostgresStats(self)

    def logs(self) -> PostgresLogs:
        return PostgresLogs(self)

    def retention(self) -> PostgresRetention:
        return PostgresRetention(self)

    def counted(self, n: int) -> None:
        """``n`` tasks became queued (negative: left the queue) outside the store's own
        writes: the queued count behind ``429``."""
        self._queued_count += n

    async def insert_rows(
        self, conn: asyncpg.Connection, records: Sequence[TaskRecord], args_json: Sequence[str]
    ) -> None:
        await insert_rows(conn, records, args_json)

    def schedules(self) -> PostgresSchedules:
        return self._schedules

    def watch_queue(self, callback: Callable[[], None]) -> None:
        """Workers on PostgreSQL learn of new tasks from the broker: never called."""

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
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
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
            except (*CONNECTION_ERRORS, asyncpg.PostgresError):
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
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        with unavailable_on_failure():
            async with self._pool.acquire(timeout=self._connect_timeout_s) as conn:
                yield conn

    @asynccontextmanager
    async def hot(self, lane: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection kept out of the pool for one hot statement (a claim, an outcome): the
        pool's acquire and release cost as much client CPU as the statement itself (measured:
        93-133 µs against 52 µs a call). The lane's connection is taken while in use, so a
        concurrent caller acquires one of its own; one connection per lane is kept afterwards,
        and one that failed (or was cancelled mid-statement) goes back to the pool."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        conn = self._pinned.pop(lane, None)
        try:
            with unavailable_on_failure():
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
        async with self.connection() as conn:
            existing = await _by_key(conn, record)
            if existing is not None:
                return existing, False
            if max_queued is not None and await self._queued(conn) >= max_queued:
                raise QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)
            row = await conn.fetchrow(
                "INSERT INTO conveyor_tasks (id, name, owner, status, priority, args, attempts, "
                "max_attempts, timeout_s, created_at, run_at, idempotency_key, published_at, "
                "batch_id) "
                "SELECT $1, $2, $3, $4, $5, $6, 0, $7, $8, k.now, k.now + $9::float8, $10, "
                f"CASE WHEN $9::float8 <= 0 THEN k.now END, $11 FROM (SELECT {NOW} AS now) k "
                "ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL "
                "DO NOTHING RETURNING seq, created_at, run_at",
                record.id,
                record.name,
                record.owner,
                record.status.value,
                record.priority,
                args_json,
                record.max_attempts,
                record.timeout_s,
                max(record.run_at - record.created_at, 0.0),
                record.idempotency_key,
                record.batch_id,
            )
            if row is None:  # a concurrent submission with the same key won
                winner = await _by_key(conn, record)
                assert winner is not None
                return winner, False
        record.seq, record.created_at, record.run_at = row[0], row[1], row[2]
        self._queued_count += 1
        return record, True

    def _flush_inserts(self, max_queued: int | None) -> None:
        batch, self._pending_inserts = self._pending_inserts, []
        self.spawn(self._insert_batch(batch, max_queued))

    def claimed(self, n: int) -> None:
        """``n`` queued tasks were claimed (by the ledger): the queued count behind ``429``."""
        self._queued_count -= n

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
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
            async with self.connection() as conn:
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
                await insert_rows(conn, records, [args for _, args, _ in batch])
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self._queued_count += len(batch)
        for record, _, future in batch:
            if not future.done():
                future.set_result((record, True))

    async def insert_many(
        self, records: Sequence[TaskRecord], *, args_json: Sequence[str], max_queued: int | None
    ) -> list[TaskRecord]:
        async with self.connection() as conn, conn.transaction():
            if max_queued is not None and await self._queued(conn) + len(records) > max_queued:
                raise QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)
            await insert_rows(conn, records, args_json)
        self._queued_count += len(records)
        return list(records)

    async def _queued(self, conn: asyncpg.Connection) -> int:
        # Counted at most every _QUEUED_RECOUNT_S: the bound is approximate by that much.
        now = time.monotonic()
        if now - self._queued_counted_at > _QUEUED_RECOUNT_S:
            self._queued_count = await conn.fetchval(QUEUED)
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
        rates: Mapping[str, Rate] | None = None,
    ) -> list[TaskRecord]:
        async with self.connection() as conn, conn.transaction():
            room = await remaining(conn, limits, rates)
            eligible = [name for name in names if room.get(name, 1) > 0]
            if not eligible:
                return []
            rows = await conn.fetch(
                f"SELECT id, name FROM conveyor_tasks WHERE status = 'queued' AND run_at <= {NOW} "
                "AND name = ANY($1::text[]) ORDER BY priority DESC, run_at, seq LIMIT $2 "
                "FOR UPDATE SKIP LOCKED",
                eligible,
                n * 4 if room else n,
            )
            chosen = choose_claims([(row[0], row[1]) for row in rows], room, n)
            if not chosen:
                return []
            claimed = await conn.fetch(
                f"UPDATE conveyor_tasks SET status = 'running', attempts = attempts + 1, "
                f"worker_id = $1, lease_expires_at = {NOW} + $2, started_at = {NOW}, "
                f"progress = 0, message = NULL WHERE id = ANY($3::text[]) RETURNING {COLUMNS}",
                worker_id,
                lease_s,
                chosen,
            )
            if rates:
                await record_starts(conn, [(row[2], row[15]) for row in claimed], rates)
        self._queued_count -= len(claimed)
        order = {task_id: i for i, task_id in enumerate(chosen)}
        return sorted((record_from_row(row) for row in claimed), key=lambda r: order[r.id])

    async def mark_started(self, task_id: str, worker_id: str, attempt: int) -> bool:
        async with self.connection() as conn:
            status = await conn.execute(
                f"UPDATE conveyor_tasks SET started_at = {NOW} WHERE {held(1, 2, 3)}",
                task_id,
                worker_id,
                attempt,
            )
        return bool(status == "UPDATE 1")

    async def set_progress(
        self, task_id: str, worker_id: str, attempt: int, progress: float, message: str | None
    ) -> bool:
        async with self.connection() as conn:
            status = await conn.execute(
                f"UPDATE conveyor_tasks SET progress = $1, message = $2 WHERE {held(3, 4, 5)}",
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
        comes within ``OUTCOME_HOLD_S``, otherwise on its own; returns once it is committed.

        A pool process runs one task at a time and takes its next message as soon as the task
        has run, so the outcome of one task usually travels with the claim of the next."""
        outcome = (status.value, result_json, blob_json, dump(error), task_id, worker_id, attempt)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._held.append((outcome, future))
        if self._held_timer is None:
            self._held_timer = loop.call_later(OUTCOME_HOLD_S, self._release_held)
        return await future  # cancelling the caller does not withdraw the outcome

    def take_held(self, task_id: str) -> HeldOutcome | None:
        """The oldest held outcome, to go with the claim for ``task_id``'s message (none for
        the message of the held task itself: one statement must not update a row twice)."""
        if not self._held or self._held[0][0][OUTCOME_TASK] == task_id:
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
            self.spawn(self.write_outcome(outcome, future))

    async def write_held(self) -> None:
        if self._held:
            futures = [future for _, future in self._held]
            self._release_held()
            await asyncio.wait(futures)

    async def write_outcome(self, outcome: tuple[Any, ...], future: asyncio.Future[bool]) -> None:
        try:
            async with self.hot("finish") as conn:
                written = await conn.execute(FINISH, *outcome)
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
        delay_s: float,
        error: dict[str, Any] | None,
        refund_attempt: bool,
    ) -> TaskRecord | None:
        async with self.connection() as conn:
            row = await conn.fetchrow(
                _REQUEUE, delay_s, dump(error), int(refund_attempt), task_id, worker_id, attempt
            )
        if row is None:
            return None
        record = record_from_row(row)
        if record.status is TaskStatus.QUEUED:
            self._queued_count += 1
        return record

    async def heartbeat(
        self, worker_id: str, task_ids: Collection[str], lease_s: float
    ) -> list[str]:
        ids = list(task_ids)
        if not ids:
            return []
        async with self.connection() as conn:
            rows = await conn.fetch(
                f"UPDATE conveyor_tasks SET lease_expires_at = {NOW} + $1 "
                "WHERE id = ANY($3::text[]) AND status = 'running' AND worker_id = $2 "
                "RETURNING id, cancel_requested",
                lease_s,
                worker_id,
                ids,
            )
        return [row[0] for row in rows if row[1]]

    async def recover_expired(self) -> list[TaskRecord]:
        cancelled, requeued, failed = _RECOVERY
        lost = dump(WORKER_LOST)
        async with self.connection() as conn, conn.transaction():
            rows = await conn.fetch(cancelled)
            rows += await conn.fetch(requeued, lost)
            rows += await conn.fetch(failed, lost)
        return [record_from_row(row) for row in rows]

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord:
        async with self.connection() as conn, conn.transaction():
            current = await _fetch(conn, task_id, owner, lock=True)
            if cancel_outcome(task_id, current.status) is TaskStatus.CANCELLED:
                sql = f"status = 'cancelled', finished_at = {NOW}"
                self._queued_count -= 1
            else:
                sql = "cancel_requested = TRUE"
            row = await conn.fetchrow(
                f"UPDATE conveyor_tasks SET {sql} WHERE id = $1 RETURNING {COLUMNS}", task_id
            )
        return record_from_row(row)

    async def retry(self, task_id: str, *, owner: str | None, attempts: int) -> TaskRecord:
        async with self.connection() as conn, conn.transaction():
            current = await _fetch(conn, task_id, owner, lock=True)
            require_retryable(task_id, current.status)
            row = await conn.fetchrow(
                f"UPDATE conveyor_tasks SET {retry_set('$1', NOW)}, published_at = {NOW} "
                f"WHERE id = $2 RETURNING {COLUMNS}",
                attempts,
                task_id,
            )
        self._queued_count += 1
        return record_from_row(row)

    async def delete(self, task_id: str, *, owner: str | None) -> None:
        async with self.connection() as conn, conn.transaction():
            current = await _fetch(conn, task_id, owner, lock=True)
            require_deletable(task_id, current.status)
            await conn.execute("DELETE FROM conveyor_tasks WHERE id = $1", task_id)

    # reads -------------------------------------------------------------------------------------

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        async with self.connection() as conn:
            return await _fetch(conn, task_id, owner)

    async def list_tasks(
        self,
        *,
        owner: str | None,
        status: TaskStatus | None = None,
        name: str | None = None,
        limit: int = 50,
        before_seq: int | None = None,
        narrowed: TaskFilter = NO_FILTER,
    ) -> list[TaskRecord]:
        async with self.connection() as conn:

            async def fetch(sql: str, param: int | None) -> Any:
                return await conn.fetchrow(sql, *(() if param is None else (param,)))

            bounds = await seq_range(narrowed, "conveyor_tasks", fetch, "$1")
            sql, params = list_query(
                "conveyor_tasks",
                lambda n: f"${n}",
                owner=owner,
                status=status,
                name=name,
                limit=limit,
                before_seq=before_seq,
                narrowed=narrowed,
                seq_range=bounds,
            )
            rows = await conn.fetch(sql, *params)
        return [record_from_row(row) for row in rows]

    async def rate_used(self, name: str, rate: Rate) -> int:
        async with self.connection() as conn:
            return int(await conn.fetchval(RATE_USED, name, rate.period_s))

    async def count_by_status(self, *, owner: str | None = None) -> dict[str, int]:
        async with self.connection() as conn:
            rows = await conn.fetch(BY_STATUS, owner)
        return {status.value: 0 for status in TaskStatus} | {row[0]: row[1] for row in rows}


async def _by_key(conn: asyncpg.Connection, record: TaskRecord) -> TaskRecord | None:
    """The task already submitted by this owner with this idempotency key."""
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM conveyor_tasks WHERE owner = $1 AND idempotency_key = $2",
        record.owner,
        record.idempotency_key,
    )
    return None if row is None else record_from_row(row)


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
