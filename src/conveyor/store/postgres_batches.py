"""Batches in PostgreSQL: a row per batch in ``conveyor_batches``; its tasks carry its id.

A batch's counts are counted from its tasks when read, through ``conveyor_tasks_batch_status``
(``batch_id, status, seq``): the cost of reading a batch grows with its size (a few
milliseconds for 100,000 items), not with the rest of the table. Items are read in submission
order and a page stops after its rows.
"""

from __future__ import annotations

import json
from collections.abc import Collection

import asyncpg

from ..batch_record import BatchRecord, NewTasks
from ..errors import BatchExists, BatchNotFound, QueueFull
from ..record import TaskRecord
from ..status import TaskStatus
from .postgres_sql import NOW, TaskInserter
from .rows import COLUMNS, record_from_row, retry_set

BATCHES = """
ALTER TABLE conveyor_tasks ADD COLUMN IF NOT EXISTS batch_id TEXT;
CREATE TABLE IF NOT EXISTS conveyor_batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    total INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS conveyor_batches_owner ON conveyor_batches (owner, created_at);
CREATE INDEX IF NOT EXISTS conveyor_tasks_batch ON conveyor_tasks (batch_id, seq)
    WHERE batch_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS conveyor_tasks_batch_status ON conveyor_tasks (batch_id, status, seq)
    WHERE batch_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS conveyor_tasks_batch_errors ON conveyor_tasks (batch_id, status)
    WHERE batch_id IS NOT NULL AND error IS NOT NULL;
CREATE TABLE IF NOT EXISTS conveyor_rate_starts (name TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS conveyor_rate_starts_name_at ON conveyor_rate_starts (name, at);
"""


# A chunk of a new batch's items: their ids and arguments as two arrays, the rest shared.
_NEW_ITEMS = (
    "INSERT INTO conveyor_tasks (id, name, owner, status, priority, args, max_attempts, "
    "timeout_s, created_at, run_at, published_at, batch_id) "
    "SELECT i, $3, $4, 'queued', $5, a, $6, $7, k.now, k.now + $8, "
    "CASE WHEN $8 <= 0 THEN k.now END, $9 FROM unnest($1::text[], $2::text[]) AS u(i, a) "
    f"CROSS JOIN (SELECT {NOW} AS now) k"
)


class PostgresBatches:
    """The :class:`~conveyor.store.base.BatchStore` of a PostgreSQL store."""

    def __init__(self, store: TaskInserter) -> None:
        self._store = store

    async def create(
        self, batch: BatchRecord, tasks: NewTasks, *, max_queued: int | None
    ) -> BatchRecord:
        chunks = list(tasks.chunks)  # every item checked before the transaction begins
        total = sum(len(ids) for ids, _ in chunks)
        store = self._store
        async with store.connection() as conn, conn.transaction():
            if max_queued is not None and await store._queued(conn) + total > max_queued:
                raise QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)
            created_at = await conn.fetchval(
                f"INSERT INTO conveyor_batches (id, owner, name, total, created_at, meta) "
                f"VALUES ($1, $2, $3, $4, {NOW}, $5) ON CONFLICT (id) DO NOTHING "
                "RETURNING created_at",
                batch.id,
                batch.owner,
                batch.name,
                total,
                json.dumps(batch.meta),
            )
            if created_at is None:
                raise BatchExists(f"batch {batch.id} exists already")
            batch.created_at = created_at
            delay = max(tasks.run_at - tasks.created_at, 0.0)  # on the database's clock
            for ids, args_json in chunks:
                await conn.execute(
                    _NEW_ITEMS,
                    ids,
                    args_json,
                    tasks.name,
                    tasks.owner,
                    tasks.priority,
                    tasks.max_attempts,
                    tasks.timeout_s,
                    delay,
                    tasks.batch_id,
                )
        store.counted(total)
        batch.total = total
        batch.counts = {status.value: 0 for status in TaskStatus}
        batch.counts[TaskStatus.QUEUED.value] = total
        if not total:
            batch.finished_at = batch.created_at
        return batch

    async def get(self, batch_id: str, *, owner: str | None) -> BatchRecord:
        async with self._store.connection() as conn:
            return await _batch(conn, batch_id, owner)

    async def list_batches(
        self, *, owner: str | None, limit: int, before: float | None, name: str | None = None
    ) -> list[BatchRecord]:
        async with self._store.connection() as conn:
            ids = await conn.fetch(
                "SELECT id FROM conveyor_batches WHERE created_at < $1 "
                "AND ($2::text IS NULL OR owner = $2) AND ($4::text IS NULL OR name = $4) "
                "ORDER BY created_at DESC LIMIT $3",
                before if before is not None else float("inf"),
                owner,
                limit,
                name,
            )
            return [await _batch(conn, row[0], None) for row in ids]

    async def items(
        self,
        batch_id: str,
        *,
        owner: str | None,
        status: TaskStatus | None,
        after_seq: int | None,
        limit: int,
        only_error: str | None = None,
        except_error: str | None = None,
    ) -> list[TaskRecord]:
        kind = "(error::json->>'type')"
        async with self._store.connection() as conn:
            await _owned(conn, batch_id, owner)
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM conveyor_tasks WHERE batch_id = $1 AND seq > $2 "
                "AND ($3::text IS NULL OR status = $3) "
                f"AND ($5::text IS NULL OR {kind} = $5) "
                f"AND ($6::text IS NULL OR {kind} IS NULL OR {kind} <> $6) "
                "ORDER BY seq LIMIT $4",
                batch_id,
                after_seq or 0,
                None if status is None else status.value,
                limit,
                only_error,
                except_error,
            )
        return [record_from_row(row) for row in rows]

    async def error_counts(self, batch_id: str) -> dict[tuple[str, str], int]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT status, error::json->>'type', count(*) FROM conveyor_tasks "
                "WHERE batch_id = $1 AND error IS NOT NULL GROUP BY 1, 2",
                batch_id,
            )
        return {(row[0], row[1]): row[2] for row in rows}

    async def cancel(self, batch_id: str, *, owner: str | None) -> tuple[int, list[str]]:
        async with self._store.connection() as conn, conn.transaction():
            await _owned(conn, batch_id, owner)
            cancelled = await conn.fetch(
                f"UPDATE conveyor_tasks SET status = 'cancelled', finished_at = {NOW} "
                "WHERE batch_id = $1 AND status = 'queued' RETURNING id",
                batch_id,
            )
            running = await conn.fetch(
                "UPDATE conveyor_tasks SET cancel_requested = TRUE "
                "WHERE batch_id = $1 AND status = 'running' RETURNING id",
                batch_id,
            )
        self._store.counted(-len(cancelled))
        return len(cancelled), [row[0] for row in running]

    async def retry(
        self,
        batch_id: str,
        *,
        owner: str | None,
        statuses: Collection[TaskStatus],
        attempts: int,
        only_error: str | None = None,
        except_error: str | None = None,
    ) -> list[TaskRecord]:
        kind = "(error::json->>'type')"
        async with self._store.connection() as conn, conn.transaction():
            await _owned(conn, batch_id, owner)
            rows = await conn.fetch(
                f"UPDATE conveyor_tasks SET {retry_set('$1', NOW)}, published_at = {NOW} "
                "WHERE batch_id = $2 AND status = ANY($3::text[]) "
                f"AND ($4::text IS NULL OR {kind} = $4) "
                f"AND ($5::text IS NULL OR {kind} IS NULL OR {kind} <> $5) RETURNING {COLUMNS}",
                attempts,
                batch_id,
                [status.value for status in statuses],
                only_error,
                except_error,
            )
        self._store.counted(len(rows))
        return [record_from_row(row) for row in rows]

    async def hasten(
        self, batch_id: str, *, owner: str | None, error_type: str | None
    ) -> list[TaskRecord]:
        async with self._store.connection() as conn, conn.transaction():
            await _owned(conn, batch_id, owner)
            rows = await conn.fetch(
                f"UPDATE conveyor_tasks SET run_at = {NOW}, published_at = {NOW} "
                "WHERE batch_id = $1 AND status = 'queued' AND error IS NOT NULL "
                f"AND run_at > {NOW} AND ($2::text IS NULL OR error::json->>'type' = $2) "
                f"RETURNING {COLUMNS}",
                batch_id,
                error_type,
            )
        return [record_from_row(row) for row in rows]


async def _owned(conn: asyncpg.Connection, batch_id: str, owner: str | None) -> None:
    found = await conn.fetchval("SELECT owner FROM conveyor_batches WHERE id = $1", batch_id)
    if found is None or (owner is not None and found != owner):
        raise BatchNotFound(f"no batch with id {batch_id}")


async def _batch(conn: asyncpg.Connection, batch_id: str, owner: str | None) -> BatchRecord:
    row = await conn.fetchrow(
        "SELECT id, owner, name, total, created_at, meta FROM conveyor_batches WHERE id = $1",
        batch_id,
    )
    if row is None or (owner is not None and row[1] != owner):
        raise BatchNotFound(f"no batch with id {batch_id}")
    counts = {status.value: 0 for status in TaskStatus}
    running_progress, finished_at = 0.0, None
    for status, n, progress, last in await conn.fetch(
        "SELECT status, count(*), coalesce(sum(progress), 0), max(finished_at) "
        "FROM conveyor_tasks WHERE batch_id = $1 GROUP BY status",
        batch_id,
    ):
        counts[status] = n
        if status == TaskStatus.RUNNING.value:
            running_progress = progress
        elif last is not None:
            finished_at = last if finished_at is None else max(finished_at, last)
    return BatchRecord(
        id=row[0],
        owner=row[1],
        name=row[2],
        total=row[3],
        created_at=row[4],
        finished_at=finished_at if row[3] else row[4],
        counts=counts,
        running_progress=running_progress,
        meta=json.loads(row[5]),
    )
