"""The SQLite store: queue and state in one WAL-mode file.

The file is reached through :class:`~conveyor.store.sqlite_commit.GroupCommit`: the writes made
during one turn of the event loop share one transaction, committed before any caller resumes.
Several processes may share the file (``conveyor serve`` plus ``conveyor worker``): each write
transaction is ``BEGIN IMMEDIATE``, so a claim is atomic across processes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import QueueFull, TaskNotFound
from ..record import TaskRecord
from ..status import TaskStatus, cancel_outcome, require_deletable, require_retryable
from .rows import (
    COLUMNS,
    WORKER_LOST,
    choose_claims,
    dump,
    list_query,
    record_from_row,
    recovery_statements,
    requeue_statement,
)
from .sqlite_commit import GroupCommit

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    args TEXT NOT NULL,
    result TEXT,
    error TEXT,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 1,
    timeout_s REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    run_at REAL NOT NULL,
    idempotency_key TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_expires_at REAL,
    result_blob TEXT
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks(priority DESC, run_at, seq)
    WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(worker_id, lease_expires_at)
    WHERE status = 'running';
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_owner_seq ON tasks(owner, seq);
CREATE INDEX IF NOT EXISTS tasks_status_seq ON tasks(status, seq);
"""

# Each step takes a store from the version before it to its own; a new store gets _SCHEMA.
_MIGRATIONS: dict[int, str] = {2: "ALTER TABLE tasks ADD COLUMN result_blob TEXT"}
_QUEUED_RECOUNT_S = 0.25
_RECOVERY = recovery_statements("tasks", now="?1", lost="?2")
_REQUEUE = requeue_statement(
    "tasks",
    param=lambda n: f"?{n}",
    now="?7",
    held="id = ?4 AND status = 'running' AND worker_id = ?5 AND attempts = ?6",
)


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


class SQLiteStore:
    """Task records in a SQLite file (WAL). See the module docstring for the threading model."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "NORMAL",
        readers: int = 2,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self._db = GroupCommit(
            self.path, synchronous=synchronous, readers=readers, busy_timeout_s=busy_timeout_s
        )
        self._write = self._db.write
        self._read = self._db.read
        self._queued_count = 0
        self._queued_counted_at = 0.0

    # lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        if not self._db.is_open:
            self._db.open(_migrate)

    async def close(self) -> None:
        await self._db.close()

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """SQLite has no cross-process notifications: waiters in other processes poll."""

    def publication_ledger(self) -> None:
        """SQLite serves only the embedded engine, which publishes nothing."""
        return None

    # writes ------------------------------------------------------------------------------------

    async def insert(
        self, record: TaskRecord, *, args_json: str, max_queued: int | None
    ) -> tuple[TaskRecord, bool]:
        def op(conn: sqlite3.Connection) -> tuple[TaskRecord, bool]:
            if record.idempotency_key is not None:
                row = conn.execute(
                    f"SELECT {COLUMNS} FROM tasks WHERE owner = ? AND idempotency_key = ?",
                    (record.owner, record.idempotency_key),
                ).fetchone()
                if row is not None:
                    return record_from_row(row), False
            self._check_room(conn, 1, max_queued)
            self._insert_row(conn, record, args_json)
            return record, True

        return await self._write(op)

    async def insert_many(
        self, records: Sequence[TaskRecord], *, args_json: Sequence[str], max_queued: int | None
    ) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            self._check_room(conn, len(records), max_queued)
            for record, args in zip(records, args_json, strict=True):
                self._insert_row(conn, record, args)
            return list(records)

        return await self._write(op)

    def _check_room(self, conn: sqlite3.Connection, n: int, max_queued: int | None) -> None:
        if max_queued is not None and self._queued(conn) + n > max_queued:
            raise QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)

    def _insert_row(self, conn: sqlite3.Connection, record: TaskRecord, args_json: str) -> None:
        cur = conn.execute(
            "INSERT INTO tasks (id, name, owner, status, priority, args, attempts, "
            "max_attempts, timeout_s, created_at, run_at, idempotency_key) "
            "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
            (
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
            ),
        )
        assert cur.lastrowid is not None
        record.seq = cur.lastrowid
        self._queued_count += 1

    def _queued(self, conn: sqlite3.Connection) -> int:
        # A recount per insert would cost more than the insert; other processes' inserts are seen
        # within _QUEUED_RECOUNT_S.
        now = time.monotonic()
        if now - self._queued_counted_at > _QUEUED_RECOUNT_S:
            (self._queued_count,) = conn.execute(
                "SELECT count(*) FROM tasks WHERE status = 'queued'"
            ).fetchone()
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
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            now = time.time()
            remaining: dict[str, int] = {}
            if limits:
                running = dict(
                    conn.execute(
                        "SELECT name, count(*) FROM tasks WHERE status = 'running' "
                        f"AND name IN ({_placeholders(len(limits))}) GROUP BY name",
                        tuple(limits),
                    ).fetchall()
                )
                remaining = {name: lim - running.get(name, 0) for name, lim in limits.items()}
            eligible = [name for name in names if remaining.get(name, 1) > 0]
            if not eligible:
                return []
            rows = conn.execute(
                "SELECT id, name FROM tasks WHERE status = 'queued' AND run_at <= ? "
                f"AND name IN ({_placeholders(len(eligible))}) "
                "ORDER BY priority DESC, run_at, seq LIMIT ?",
                (now, *eligible, n * 4 if remaining else n),
            ).fetchall()
            chosen = choose_claims(rows, remaining, n)
            if not chosen:
                return []
            claimed = conn.execute(
                "UPDATE tasks SET status = 'running', attempts = attempts + 1, worker_id = ?, "
                "lease_expires_at = ?, started_at = ?, progress = 0, message = NULL "
                f"WHERE id IN ({_placeholders(len(chosen))}) RETURNING {COLUMNS}",
                (worker_id, now + lease_s, now, *chosen),
            ).fetchall()
            self._queued_count -= len(claimed)
            order = {task_id: i for i, task_id in enumerate(chosen)}
            return sorted((record_from_row(row) for row in claimed), key=lambda r: order[r.id])

        return await self._write(op)

    async def mark_started(self, task_id: str, worker_id: str, attempt: int) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tasks SET started_at = ? WHERE id = ? AND status = 'running' "
                "AND worker_id = ? AND attempts = ?",
                (time.time(), task_id, worker_id, attempt),
            )
            return cur.rowcount == 1

        return await self._write(op)

    async def set_progress(
        self, task_id: str, worker_id: str, attempt: int, progress: float, message: str | None
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tasks SET progress = ?, message = ? WHERE id = ? AND status = 'running' "
                "AND worker_id = ? AND attempts = ?",
                (progress, message, task_id, worker_id, attempt),
            )
            return cur.rowcount == 1

        return await self._write(op)

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
        error_json = dump(error)

        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE tasks SET status = ?, result = ?, result_blob = ?, error = ?, "
                "finished_at = ?, lease_expires_at = NULL, "
                "progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END "
                "WHERE id = ? AND status = 'running' AND worker_id = ? AND attempts = ?",
                (
                    status.value,
                    result_json,
                    blob_json,
                    error_json,
                    time.time(),
                    status.value,
                    task_id,
                    worker_id,
                    attempt,
                ),
            )
            return cursor.rowcount == 1

        return await self._write(op)

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
        error_json = dump(error)

        def op(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(
                _REQUEUE,
                (
                    delay_s,
                    error_json,
                    int(refund_attempt),
                    task_id,
                    worker_id,
                    attempt,
                    time.time(),
                ),
            ).fetchone()
            if row is None:
                return None
            record = record_from_row(row)
            if record.status is TaskStatus.QUEUED:
                self._queued_count += 1
            return record

        return await self._write(op)

    async def heartbeat(
        self, worker_id: str, task_ids: Collection[str], lease_s: float
    ) -> list[str]:
        ids = list(task_ids)
        if not ids:
            return []

        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "UPDATE tasks SET lease_expires_at = ? WHERE status = 'running' "
                f"AND worker_id = ? AND id IN ({_placeholders(len(ids))}) "
                "RETURNING id, cancel_requested",
                (time.time() + lease_s, worker_id, *ids),
            ).fetchall()
            return [task_id for task_id, cancel in rows if cancel]

        return await self._write(op)

    async def recover_expired(self) -> list[TaskRecord]:
        cancelled, requeued, failed = _RECOVERY
        lost = dump(WORKER_LOST)

        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            now = time.time()
            rows = conn.execute(cancelled, (now,)).fetchall()
            rows += conn.execute(requeued, (now, lost)).fetchall()
            rows += conn.execute(failed, (now, lost)).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._write(op)

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord:
        def op(conn: sqlite3.Connection) -> TaskRecord:
            current = _fetch(conn, task_id, owner)
            if cancel_outcome(task_id, current.status) is TaskStatus.CANCELLED:
                sql = "status = 'cancelled', finished_at = ?"
                params: tuple[Any, ...] = (time.time(),)
                self._queued_count -= 1
            else:
                sql, params = "cancel_requested = 1", ()
            row = conn.execute(
                f"UPDATE tasks SET {sql} WHERE id = ? RETURNING {COLUMNS}", (*params, task_id)
            ).fetchone()
            return record_from_row(row)

        return await self._write(op)

    async def retry(self, task_id: str, *, owner: str | None, attempts: int) -> TaskRecord:
        def op(conn: sqlite3.Connection) -> TaskRecord:
            current = _fetch(conn, task_id, owner)
            require_retryable(task_id, current.status)
            row = conn.execute(
                "UPDATE tasks SET status = 'queued', max_attempts = attempts + ?, run_at = ?, "
                "result = NULL, result_blob = NULL, error = NULL, progress = 0, message = NULL, "
                "started_at = NULL, "
                "finished_at = NULL, cancel_requested = 0, worker_id = NULL "
                f"WHERE id = ? RETURNING {COLUMNS}",
                (attempts, time.time(), task_id),
            ).fetchone()
            self._queued_count += 1
            return record_from_row(row)

        return await self._write(op)

    async def delete(self, task_id: str, *, owner: str | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            current = _fetch(conn, task_id, owner)
            require_deletable(task_id, current.status)
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))

        await self._write(op)

    # reads -------------------------------------------------------------------------------------

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        if self._db.inline and self._db.loop_conn is not None:
            try:  # a point read by primary key: cheaper here than a thread hand-off
                return _fetch(self._db.loop_conn, task_id, owner)
            except sqlite3.OperationalError:
                pass  # locked during WAL recovery: read from the pool, which may wait
        return await self._read(lambda conn: _fetch(conn, task_id, owner))

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
            "tasks",
            lambda _: "?",
            owner=owner,
            status=status,
            name=name,
            limit=limit,
            before_seq=before_seq,
        )
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [record_from_row(row) for row in rows]

    async def count_by_status(self, *, owner: str | None = None) -> dict[str, int]:
        where, params = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT status, count(*) FROM tasks {where} GROUP BY status", params
            ).fetchall()
        )
        return {status.value: 0 for status in TaskStatus} | dict(rows)


def _fetch(conn: sqlite3.Connection, task_id: str, owner: str | None) -> TaskRecord:
    row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None or (owner is not None and row[3] != owner):
        raise TaskNotFound(f"no task with id {task_id}")
    return record_from_row(row)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tasks'"
        ).fetchone()
        if not exists:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        else:
            for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                conn.execute(_MIGRATIONS[target])
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
