"""Where worker processes register themselves: one row per process, renewed by its heartbeat.

A worker upserts its row at every heartbeat (at most once a second) with the number of tasks it
runs, and deletes it when it stops; a process that died leaves its row, which is not listed once
its last heartbeat is older than the lease (``lease_s``) and is deleted by any later beat after
ten leases. Times are on the store's clock (PostgreSQL's, not the hosts').
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import asyncpg

from ..record import WorkerRecord
from ..serialization import dumps, loads
from .postgres_sql import NOW

T = TypeVar("T")

COLUMNS = "id, host, pid, engine, concurrency, task_types, started_at, last_heartbeat_at, running"
SQLITE_WORKERS = """
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    engine TEXT NOT NULL,
    concurrency INTEGER NOT NULL,
    task_types TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_heartbeat_at REAL NOT NULL,
    running INTEGER NOT NULL
);
"""
POSTGRES_WORKERS = """
CREATE TABLE IF NOT EXISTS conveyor_workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    engine TEXT NOT NULL,
    concurrency INTEGER NOT NULL,
    task_types TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    last_heartbeat_at DOUBLE PRECISION NOT NULL,
    running INTEGER NOT NULL
);
"""
_FORGET_AFTER_LEASES = 10


def _record(row: Sequence[Any]) -> WorkerRecord:
    return WorkerRecord(
        id=row[0],
        host=row[1],
        pid=row[2],
        engine=row[3],
        concurrency=row[4],
        task_types=loads(row[5]),
        started_at=row[6],
        last_heartbeat_at=row[7],
        running=row[8],
    )


def _registered(worker: WorkerRecord) -> tuple[Any, ...]:
    """The columns a worker's row is inserted with, up to ``started_at``."""
    return (
        worker.id,
        worker.host,
        worker.pid,
        worker.engine,
        worker.concurrency,
        dumps(worker.task_types),
        worker.started_at,
    )


class _File(Protocol):
    def _write(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...


class SQLiteWorkers:
    """The :class:`~conveyor.store.base.WorkerStore` of a SQLite file."""

    def __init__(self, store: _File) -> None:
        self._store = store

    async def beat(self, worker: WorkerRecord, *, lease_s: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                f"INSERT INTO workers ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = excluded.last_heartbeat_at, "
                "running = excluded.running",
                (*_registered(worker), now, worker.running),
            )
            conn.execute(
                "DELETE FROM workers WHERE last_heartbeat_at < ?",
                (now - _FORGET_AFTER_LEASES * lease_s,),
            )

        await self._store._write(op)

    async def gone(self, worker_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

        await self._store._write(op)

    async def alive(self, *, lease_s: float) -> list[WorkerRecord]:
        def op(conn: sqlite3.Connection) -> list[WorkerRecord]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM workers WHERE last_heartbeat_at >= ? ORDER BY started_at",
                (time.time() - lease_s,),
            ).fetchall()
            return [_record(row) for row in rows]

        return await self._store._read(op)


class _Pool(Protocol):
    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...


class PostgresWorkers:
    """The :class:`~conveyor.store.base.WorkerStore` of a PostgreSQL store."""

    def __init__(self, store: _Pool) -> None:
        self._store = store

    async def beat(self, worker: WorkerRecord, *, lease_s: float) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                f"INSERT INTO conveyor_workers ({COLUMNS}) "
                f"VALUES ($1, $2, $3, $4, $5, $6, $7, {NOW}, $8) "
                "ON CONFLICT (id) DO UPDATE SET last_heartbeat_at = excluded.last_heartbeat_at, "
                "running = excluded.running",
                *_registered(worker),
                worker.running,
            )
            await conn.execute(
                f"DELETE FROM conveyor_workers WHERE last_heartbeat_at < {NOW} - $1",
                _FORGET_AFTER_LEASES * lease_s,
            )

    async def gone(self, worker_id: str) -> None:
        async with self._store.connection() as conn:
            await conn.execute("DELETE FROM conveyor_workers WHERE id = $1", worker_id)

    async def alive(self, *, lease_s: float) -> list[WorkerRecord]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM conveyor_workers "
                f"WHERE last_heartbeat_at >= {NOW} - $1 ORDER BY started_at",
                lease_s,
            )
        return [_record(row) for row in rows]
