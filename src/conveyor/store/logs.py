"""Where a task's own log lines are kept: appended by the worker running it, read by
``GET /tasks/{id}/logs``, deleted with the task. Each task keeps its last ``MAX_LINES`` lines
(older ones are deleted as new ones arrive); lines page in the order they were logged."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

import asyncpg

from ..tasklogs import MAX_LINES, LogLine

T = TypeVar("T")

SQLITE_LOGS = """
CREATE TABLE IF NOT EXISTS task_logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    at REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    attempt INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS task_logs_task ON task_logs (task_id, seq);
"""
POSTGRES_LOGS = """
CREATE TABLE IF NOT EXISTS conveyor_task_logs (
    seq BIGSERIAL PRIMARY KEY,
    task_id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    attempt INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS conveyor_task_logs_task ON conveyor_task_logs (task_id, seq);
"""


class _File(Protocol):
    def _write(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...


class SQLiteLogs:
    def __init__(self, store: _File) -> None:
        self._store = store

    async def append(self, task_id: str, lines: Sequence[LogLine]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO task_logs (task_id, at, level, message, attempt) "
                "VALUES (?, ?, ?, ?, ?)",
                [(task_id, ln.at, ln.level, ln.message, ln.attempt) for ln in lines],
            )
            conn.execute(
                "DELETE FROM task_logs WHERE task_id = ?1 AND seq <= (SELECT seq FROM task_logs "
                "WHERE task_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                (task_id, MAX_LINES),
            )

        await self._store._write(op)

    async def read(self, task_id: str, *, after: int, limit: int) -> list[tuple[int, LogLine]]:
        def op(conn: sqlite3.Connection) -> list[tuple[int, LogLine]]:
            rows = conn.execute(
                "SELECT seq, at, level, message, attempt FROM task_logs "
                "WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (task_id, after, limit),
            ).fetchall()
            return [(row[0], LogLine(row[1], row[2], row[3], row[4])) for row in rows]

        return await self._store._read(op)

    async def delete(self, task_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM task_logs WHERE task_id = ?", (task_id,))

        await self._store._write(op)


class _Pool(Protocol):
    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...


class PostgresLogs:
    def __init__(self, store: _Pool) -> None:
        self._store = store

    async def append(self, task_id: str, lines: Sequence[LogLine]) -> None:
        async with self._store.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO conveyor_task_logs (task_id, at, level, message, attempt) "
                "SELECT $1, * FROM unnest($2::float8[], $3::text[], $4::text[], $5::int[])",
                task_id,
                [ln.at for ln in lines],
                [ln.level for ln in lines],
                [ln.message for ln in lines],
                [ln.attempt for ln in lines],
            )
            await conn.execute(
                "DELETE FROM conveyor_task_logs WHERE task_id = $1 AND seq <= (SELECT seq FROM "
                "conveyor_task_logs WHERE task_id = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)",
                task_id,
                MAX_LINES,
            )

    async def read(self, task_id: str, *, after: int, limit: int) -> list[tuple[int, LogLine]]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT seq, at, level, message, attempt FROM conveyor_task_logs "
                "WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                task_id,
                after,
                limit,
            )
        return [(row[0], LogLine(row[1], row[2], row[3], row[4])) for row in rows]

    async def delete(self, task_id: str) -> None:
        async with self._store.connection() as conn:
            await conn.execute("DELETE FROM conveyor_task_logs WHERE task_id = $1", task_id)
