"""What a metrics scrape reads of a store: task counts by type and status, the age of the
oldest queued task, and the totals of what every process counted. The first two are a constant
number of index reads on SQLite (``task_counts`` is one row per owner, type and status; the
oldest queued task is the first of ``tasks_status_seq``); on PostgreSQL the counts are summed
from ``conveyor_task_counts``, which the database keeps (``postgres_counts.py``). The totals
(``metric_totals``) are one row per series, each process adding what it counted
(``conveyor.tally``) about once a second.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import asyncpg

from .postgres_counts import BY_TYPE, FOLD, LOCK_FOLD
from .postgres_sql import NOW

T = TypeVar("T")

SQLITE_TOTALS = """
CREATE TABLE IF NOT EXISTS metric_totals (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    le TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (metric, labels, le)
) WITHOUT ROWID;
"""
POSTGRES_TOTALS = """
CREATE TABLE IF NOT EXISTS conveyor_metric_totals (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    le TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (metric, labels, le)
);
"""
Row = tuple[str, str, str, float]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Task counts by ``(task type, status)`` (of one owner, or all); the oldest queued task's
    age (seconds, None when nothing is queued; every owner's), on the store's clock."""

    counts: dict[tuple[str, str], int]
    oldest_queued_age_s: float | None


class _File(Protocol):
    def _read(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...


class SQLiteStats:
    def __init__(self, store: _File) -> None:
        self._store = store

    async def snapshot(self, *, owner: str | None = None) -> Snapshot:
        def op(conn: sqlite3.Connection) -> Snapshot:
            rows = conn.execute(
                "SELECT name, status, sum(n) FROM task_counts WHERE ?1 IS NULL OR owner = ?1 "
                "GROUP BY name, status",
                (owner,),
            ).fetchall()
            oldest = conn.execute(
                "SELECT created_at FROM tasks INDEXED BY tasks_status_seq "
                "WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            age = None if oldest is None else max(0.0, time.time() - oldest[0])
            return Snapshot({(name, status): n for name, status, n in rows}, age)

        return await self._store._read(op)

    async def add_totals(self, rows: Sequence[Row]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO metric_totals (metric, labels, le, value) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (metric, labels, le) DO UPDATE SET value = value + excluded.value",
                rows,
            )

        await self._store._write(op)

    async def since(self, metric: str, start: str) -> list[tuple[str, str, float]]:
        """``metric``'s series ``(labels, le, value)`` whose ``le`` is ``start`` or later."""

        def op(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
            return conn.execute(
                "SELECT labels, le, value FROM metric_totals WHERE metric = ? AND le >= ?",
                (metric, start),
            ).fetchall()

        return await self._store._read(op)

    async def prune(self, metric: str, before: str) -> None:
        """Forget ``metric``'s series whose ``le`` (a minute) is before ``before``."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM metric_totals WHERE metric = ? AND le < ?", (metric, before))

        await self._store._write(op)

    async def totals(self) -> list[Row]:
        def op(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute("SELECT metric, labels, le, value FROM metric_totals").fetchall()

        return await self._store._read(op)


class _Pool(Protocol):
    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...


class PostgresStats:
    def __init__(self, store: _Pool) -> None:
        self._store = store

    async def snapshot(self, *, owner: str | None = None) -> Snapshot:
        async with self._store.connection() as conn:
            rows = await conn.fetch(BY_TYPE, owner)
            age = await conn.fetchval(
                f"SELECT greatest(0, {NOW} - created_at) FROM conveyor_tasks "
                "WHERE status = 'queued' ORDER BY seq LIMIT 1"
            )
        return Snapshot({(row[0], row[1]): row[2] for row in rows}, age)

    async def add_totals(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        columns = [[row[i] for row in rows] for i in range(4)]
        async with self._store.connection() as conn:
            await conn.execute(
                "INSERT INTO conveyor_metric_totals (metric, labels, le, value) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) "
                "ON CONFLICT (metric, labels, le) "
                "DO UPDATE SET value = conveyor_metric_totals.value + excluded.value",
                *columns,
            )

    async def since(self, metric: str, start: str) -> list[tuple[str, str, float]]:
        """``metric``'s series ``(labels, le, value)`` whose ``le`` is ``start`` or later."""
        async with self._store.connection() as conn:
            found = await conn.fetch(
                "SELECT labels, le, value FROM conveyor_metric_totals "
                "WHERE metric = $1 AND le >= $2",
                metric,
                start,
            )
        return [(row[0], row[1], row[2]) for row in found]

    async def prune(self, metric: str, before: str) -> None:
        """Forget ``metric``'s series whose ``le`` (a minute) is before ``before``; and fold the
        task counts of closed connections (``postgres_counts.py``), when no one else is."""
        async with self._store.connection() as conn:
            await conn.execute(
                "DELETE FROM conveyor_metric_totals WHERE metric = $1 AND le < $2", metric, before
            )
            async with conn.transaction():
                if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_FOLD):
                    await conn.execute(FOLD)

    async def totals(self) -> list[Row]:
        async with self._store.connection() as conn:
            found = await conn.fetch("SELECT metric, labels, le, value FROM conveyor_metric_totals")
        return [(row[0], row[1], row[2], row[3]) for row in found]
