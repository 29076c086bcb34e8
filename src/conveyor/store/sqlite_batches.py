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

import asyncio
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol, TypeVar

from ..batch_record import BatchRecord, NewTasks
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
_NEW_BATCH = (
    "INSERT INTO batches (id, owner, name, total, created_at, meta) "
    "VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (id) DO NOTHING"
)
# A chunk of a new batch's items, given as one JSON array of [id, arguments] pairs: SQLite
# takes them apart itself, so the statement runs once per chunk, not once per row.
_NEW_ITEMS = (
    "INSERT INTO tasks (id, name, owner, status, priority, args, attempts, max_attempts, "
    "timeout_s, created_at, run_at, batch_id) SELECT value ->> 0, ?2, ?3, 'queued', ?4, "
    "value -> 1, 0, ?5, ?6, ?7, ?8, ?9 FROM json_each(?1)"
)
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


class GivenUp(Exception):
    """A batch's submission stopped before its items were all made: nothing is committed."""


_GIVEN_UP = "the batch was given up while its items were made"


def _batch_row(batch: BatchRecord) -> tuple[Any, ...]:
    return (batch.id, batch.owner, batch.name, batch.created_at, dump(batch.meta))


def _items_json(ids: list[str], args_json: list[str]) -> str:
    """``[[id, arguments], …]``: the ids are Conveyor's own (no character to escape)."""
    return "[" + ",".join([f'["{i}",{a}]' for i, a in zip(ids, args_json, strict=True)]) + "]"


class _Tally(Protocol):
    """What a batch's insert tells the store's tally (``WriteTally``)."""

    def added(
        self, owner: str, name: str, status: str, batch_id: str | None, ids: list[str]
    ) -> None: ...


class _File(Protocol):
    """What batches need of the SQLite store: its writes and reads, and the tally that counts
    the tasks' moves."""

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _check_room(self, conn: sqlite3.Connection, n: int, max_queued: int | None) -> None: ...

    def _write_alone(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]: ...

    @property
    def _counts(self) -> _Tally: ...

    def _moved(self, record: TaskRecord, old: str) -> None: ...


class SQLiteBatches:
    """The :class:`~conveyor.store.base.BatchStore` of a SQLite store."""

    def __init__(self, store: _File) -> None:
        self._store = store

    async def create(
        self, batch: BatchRecord, tasks: NewTasks, *, max_queued: int | None
    ) -> BatchRecord:
        """The rows go in one transaction of their own on the writer thread, a chunk per
        statement (``INSERT ... SELECT`` over the chunk as one JSON array, during which SQLite
        holds no interpreter lock), while the next chunks are made on another thread."""
        store = self._store
        feed: queue.SimpleQueue[tuple[list[str], str] | Exception | None]
        feed = queue.SimpleQueue()
        given_up = threading.Event()

        def op(conn: sqlite3.Connection) -> BatchRecord:
            try:
                return write(conn)
            except BaseException:
                given_up.set()  # the chunks still to come are not made
                raise

        def write(conn: sqlite3.Connection) -> BatchRecord:
            if conn.execute(_NEW_BATCH, _batch_row(batch)).rowcount == 0:
                raise BatchExists(f"batch {batch.id} exists already")
            total = 0
            while (rows := feed.get()) is not None:
                if isinstance(rows, Exception):
                    raise rows
                ids, items = rows
                store._counts.added(tasks.owner, tasks.name, "queued", tasks.batch_id, ids)
                cursor = conn.execute(
                    _NEW_ITEMS,
                    (
                        items,
                        tasks.name,
                        tasks.owner,
                        tasks.priority,
                        tasks.max_attempts,
                        tasks.timeout_s,
                        tasks.created_at,
                        tasks.run_at,
                        tasks.batch_id,
                    ),
                )
                total += cursor.rowcount
            store._check_room(conn, 0, max_queued)  # the tally counts the new rows already
            conn.execute(
                "UPDATE batches SET total = ?2, finished_at = CASE WHEN ?2 = 0 THEN created_at "
                "END WHERE id = ?1",
                (batch.id, total),
            )
            batch.total = total
            batch.finished_at = None if total else batch.created_at
            return batch

        def make() -> None:
            try:
                for ids, args_json in tasks.chunks:
                    if given_up.is_set():
                        return
                    feed.put((ids, _items_json(ids, args_json)))
            except Exception as exc:  # an item refused: the batch is rolled back
                feed.put(exc)
                return
            except BaseException:
                feed.put(GivenUp(_GIVEN_UP))
                raise
            feed.put(None)

        written = store._write_alone(op)
        try:
            await asyncio.to_thread(make)
        except BaseException:  # cancelled (the thread may never start): roll back
            given_up.set()
            feed.put(GivenUp(_GIVEN_UP))
            written.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        stored = await written
        stored.counts = {status.value: 0 for status in TaskStatus}
        stored.counts[TaskStatus.QUEUED.value] = stored.total
        return stored

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
