"""Batches in the SQLite file: a row per batch, and its counts by status.

A batch's tasks are ordinary rows of ``tasks`` carrying its id. Its counts live in
``batch_counts`` (one row per batch and status), kept in step by the same per-transaction tally
as ``task_counts`` (:class:`~conveyor.store.sqlite_tally.WriteTally`): reading a batch costs
the same with ten items or a million. Its items are read in submission order through ``tasks_batch``
(``batch_id, seq``); filtered by status, through ``tasks_status_seq`` (``status, seq``) within
the batch's ``seq`` range (its first and last item, two reads of ``tasks_batch``: a batch is
committed in one transaction, so its items are contiguous in ``seq``). A page stops after its
rows. No index carries a batch item's status: each status move would rewrite it (measured: the
drain of a 100,000-item batch at 0.85x single tasks with one, 0.95x without).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar

from ..batch_record import BatchRecord
from ..errors import BatchExists, BatchNotFound
from ..record import TaskRecord
from ..status import TaskStatus
from .rows import COLUMNS, dump, record_from_row, retry_set

T = TypeVar("T")

BATCHES = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    total INTEGER NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, created_at);
CREATE TABLE IF NOT EXISTS batch_counts (
    batch_id TEXT NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (batch_id, status)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_batch ON tasks(batch_id, seq) WHERE batch_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_batch_errors ON tasks(batch_id, status)
    WHERE batch_id IS NOT NULL AND error IS NOT NULL;
"""
# Written by the tally before each commit, for each batch whose counts moved.
BATCH_ADD = "UPDATE batch_counts SET n = n + ? WHERE batch_id = ? AND status = ?"
BATCH_NEW = "INSERT INTO batch_counts (batch_id, status, n) VALUES (?, ?, ?)"
BATCH_FINISHED = (
    "UPDATE batches SET finished_at = CASE WHEN (SELECT coalesce(sum(n), 0) FROM batch_counts "
    "WHERE batch_id = ?1 AND status IN ('queued', 'running')) = 0 "
    "THEN coalesce(finished_at, ?2) END WHERE id = ?1"
)
_BATCH = "SELECT id, owner, name, total, created_at, finished_at, meta FROM batches WHERE id = ?"
# The batch's items with an error, by status and error type (a retried or deferred item keeps
# the error of its last attempt while queued): a walk over those items only.
# the first and the last item of a batch, each read off one end of its index entries
_SPAN = (
    "SELECT (SELECT seq FROM tasks INDEXED BY tasks_batch WHERE batch_id = ?1 ORDER BY seq "
    "LIMIT 1), (SELECT seq FROM tasks INDEXED BY tasks_batch WHERE batch_id = ?1 "
    "ORDER BY seq DESC LIMIT 1)"
)
# a batch's items of one status: that status's entries within the batch's seq range
BY_STATUS = "tasks INDEXED BY tasks_status_seq"
IN_SPAN = "status = ? AND seq >= ? AND seq <= ? AND batch_id = ?"


def span(conn: sqlite3.Connection, batch_id: str) -> tuple[int, int]:
    """The batch's first and last ``seq`` (an empty range for a batch without items)."""
    first, last = conn.execute(_SPAN, (batch_id,)).fetchone()
    return (first, last) if first is not None else (1, 0)


_ERRORS = (
    "SELECT status, json_extract(error, '$.type'), count(*) FROM tasks "
    "INDEXED BY tasks_batch_errors WHERE batch_id = ? AND error IS NOT NULL GROUP BY 1, 2"
)


class _File(Protocol):
    """What batches need of the SQLite store: its writes and reads, its counted task insert,
    and the tally that counts a task's moves."""

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _check_room(self, conn: sqlite3.Connection, n: int, max_queued: int | None) -> None: ...

    def _insert_row(self, conn: sqlite3.Connection, record: TaskRecord, args_json: str) -> None: ...

    def _moved(self, record: TaskRecord, old: str) -> None: ...


class SQLiteBatches:
    """The :class:`~conveyor.store.base.BatchStore` of a SQLite store."""

    def __init__(self, store: _File) -> None:
        self._store = store

    async def create(
        self,
        batch: BatchRecord,
        records: Sequence[TaskRecord],
        *,
        args_json: Sequence[str],
        max_queued: int | None,
    ) -> BatchRecord:
        store = self._store

        def op(conn: sqlite3.Connection) -> BatchRecord:
            store._check_room(conn, len(records), max_queued)
            inserted = conn.execute(
                "INSERT INTO batches (id, owner, name, total, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (
                    batch.id,
                    batch.owner,
                    batch.name,
                    batch.total,
                    batch.created_at,
                    dump(batch.meta),
                ),
            )
            if inserted.rowcount == 0:
                raise BatchExists(f"batch {batch.id} exists already")
            for record, args in zip(records, args_json, strict=True):
                store._insert_row(conn, record, args)
            if not records:
                conn.execute(
                    "UPDATE batches SET finished_at = created_at WHERE id = ?", (batch.id,)
                )
                batch.finished_at = batch.created_at
            batch.counts = {status.value: 0 for status in TaskStatus}
            batch.counts[TaskStatus.QUEUED.value] = len(records)
            return batch

        return await store._write(op)

    async def get(self, batch_id: str, *, owner: str | None) -> BatchRecord:
        return await self._store._read(lambda conn: _batch(conn, batch_id, owner))

    async def list_batches(
        self, *, owner: str | None, limit: int, before: float | None, name: str | None = None
    ) -> list[BatchRecord]:
        def op(conn: sqlite3.Connection) -> list[BatchRecord]:
            where = ["created_at < ?"]
            params: list[Any] = [before if before is not None else float("inf")]
            for column, value in (("owner", owner), ("name", name)):
                if value is not None:
                    where.append(f"{column} = ?")
                    params.append(value)
            ids = conn.execute(
                f"SELECT id FROM batches WHERE {' AND '.join(where)} "
                "ORDER BY created_at DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [_batch(conn, batch_id, None) for (batch_id,) in ids]

        return await self._store._read(op)

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
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            _batch(conn, batch_id, owner)
            if status is None:
                source = "tasks INDEXED BY tasks_batch"
                where, params = ["batch_id = ?", "seq > ?"], [batch_id, after_seq or 0]
            else:
                first, last = span(conn, batch_id)
                source, where = BY_STATUS, [IN_SPAN]
                params = [status.value, max(first, (after_seq or 0) + 1), last, batch_id]
            kind = "json_extract(error, '$.type')"
            if only_error is not None:
                where.append(f"{kind} = ?")
                params.append(only_error)
            if except_error is not None:
                where.append(f"({kind} IS NULL OR {kind} <> ?)")
                params.append(except_error)
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM {source} WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._store._read(op)

    async def error_counts(self, batch_id: str) -> dict[tuple[str, str], int]:
        rows = await self._store._read(lambda conn: conn.execute(_ERRORS, (batch_id,)).fetchall())
        return {(status, kind): n for status, kind, n in rows}

    async def cancel(self, batch_id: str, *, owner: str | None) -> tuple[int, list[str]]:
        """Cancel the queued items, request cancellation of the running ones: how many were
        cancelled, and the ids of those asked to stop."""
        store = self._store

        def op(conn: sqlite3.Connection) -> tuple[int, list[str]]:
            _batch(conn, batch_id, owner)
            first, last = span(conn, batch_id)
            rows = conn.execute(
                f"UPDATE {BY_STATUS} SET status = 'cancelled', finished_at = ? WHERE {IN_SPAN} "
                f"RETURNING {COLUMNS}",
                (time.time(), "queued", first, last, batch_id),
            ).fetchall()
            for row in rows:
                store._moved(record_from_row(row), "queued")
            running = conn.execute(
                f"UPDATE {BY_STATUS} SET cancel_requested = 1 WHERE {IN_SPAN} RETURNING id",
                ("running", first, last, batch_id),
            ).fetchall()
            return len(rows), [task_id for (task_id,) in running]

        return await store._write(op)

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
        """Put the items in ``statuses`` (failed or cancelled) back in the queue, each with a
        new budget of ``attempts`` (filtered by error type)."""
        store = self._store
        wanted = [status.value for status in statuses]
        kind = "json_extract(error, '$.type')"
        where, params = IN_SPAN, []
        if only_error is not None:
            where, params = f"{where} AND {kind} = ?", [only_error]
        if except_error is not None:
            where += f" AND ({kind} IS NULL OR {kind} <> ?)"
            params.append(except_error)

        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            _batch(conn, batch_id, owner)
            first, last = span(conn, batch_id)
            records: list[TaskRecord] = []
            for status in wanted:
                rows = conn.execute(
                    f"UPDATE {BY_STATUS} SET {retry_set('?', '?')} WHERE {where} "
                    f"RETURNING {COLUMNS}",
                    (attempts, time.time(), status, first, last, batch_id, *params),
                ).fetchall()
                for row in rows:
                    record = record_from_row(row)
                    store._moved(record, status)
                    records.append(record)
            return records

        return await store._write(op)

    async def hasten(
        self, batch_id: str, *, owner: str | None, error_type: str | None
    ) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            _batch(conn, batch_id, owner)
            now = time.time()
            rows = conn.execute(
                "UPDATE tasks INDEXED BY tasks_batch_errors SET run_at = ? "
                "WHERE batch_id = ? AND status = 'queued' AND error IS NOT NULL AND run_at > ? "
                f"AND (? IS NULL OR json_extract(error, '$.type') = ?) RETURNING {COLUMNS}",
                (now, batch_id, now, error_type, error_type),
            ).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._store._write(op)


def _batch(conn: sqlite3.Connection, batch_id: str, owner: str | None) -> BatchRecord:
    row = conn.execute(_BATCH, (batch_id,)).fetchone()
    if row is None or (owner is not None and row[1] != owner):
        raise BatchNotFound(f"no batch with id {batch_id}")
    counts = {status.value: 0 for status in TaskStatus}
    counts.update(
        conn.execute(
            "SELECT status, n FROM batch_counts WHERE batch_id = ?", (batch_id,)
        ).fetchall()
    )
    running_progress = 0.0
    if counts[TaskStatus.RUNNING.value]:
        (running_progress,) = conn.execute(
            f"SELECT coalesce(sum(progress), 0) FROM {BY_STATUS} WHERE {IN_SPAN}",
            ("running", *span(conn, batch_id), batch_id),
        ).fetchone()
    return BatchRecord(
        id=row[0],
        owner=row[1],
        name=row[2],
        total=row[3],
        created_at=row[4],
        finished_at=row[5],
        counts=counts,
        running_progress=running_progress,
        meta=json.loads(row[6]),
    )
