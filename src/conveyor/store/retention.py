"""Deleting finished tasks (and their log lines) that are older than the retention, a small
batch per transaction so that submissions are never held behind a long delete.

A batch is up to ``limit`` tasks of one terminal status that finished before the cutoff, taken
among the ``WINDOW * limit`` oldest of that status on the ``(status, seq)`` index: a purge reads
a bounded number of rows whatever the history's size (seq order is submission order, close to
finishing order; a task that finished late stays in the window until it expires, which at worst
slows a purge down, never makes it scan the table). On SQLite each
deletion moves the task out of ``task_counts`` and its batch's ``batch_counts`` in the same
transaction (the write tally, as a single ``DELETE /tasks/{id}`` does).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

import asyncpg

from .sqlite_tally import WriteTally

T = TypeVar("T")
WINDOW = 10


class _File(Protocol):
    _counts: WriteTally

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...


class SQLiteRetention:
    def __init__(self, store: _File) -> None:
        self._store = store

    async def purge(self, status: str, *, finished_before: float, limit: int) -> list[str]:
        """Delete up to ``limit`` tasks of ``status`` finished before ``finished_before``."""
        store = self._store

        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id, owner, name, batch_id FROM (SELECT id, owner, name, batch_id, "
                "finished_at FROM tasks INDEXED BY tasks_status_seq WHERE status = ? "
                "ORDER BY seq LIMIT ?) WHERE finished_at < ? LIMIT ?",
                (status, WINDOW * limit, finished_before, limit),
            ).fetchall()
            ids = [row[0] for row in rows]
            if not ids:
                return ids
            marks = ",".join("?" * len(ids))
            conn.execute(f"DELETE FROM tasks WHERE id IN ({marks})", ids)
            conn.execute(f"DELETE FROM task_logs WHERE task_id IN ({marks})", ids)
            for task_id, owner, name, batch_id in rows:
                store._counts.moved(task_id, owner, name, status, None, batch_id)
            return ids

        return await store._write(op)


class _Pool(Protocol):
    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...


class PostgresRetention:
    def __init__(self, store: _Pool) -> None:
        self._store = store

    async def purge(self, status: str, *, finished_before: float, limit: int) -> list[str]:
        async with self._store.connection() as conn, conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM conveyor_tasks WHERE id IN (SELECT id FROM (SELECT id, finished_at "
                "FROM conveyor_tasks WHERE status = $1 ORDER BY seq LIMIT $4) oldest "
                "WHERE finished_at < $2 LIMIT $3) RETURNING id",
                status,
                finished_before,
                limit,
                WINDOW * limit,
            )
            ids = [row[0] for row in rows]
            if ids:
                await conn.execute(
                    "DELETE FROM conveyor_task_logs WHERE task_id = ANY($1::text[])", ids
                )
        return ids
