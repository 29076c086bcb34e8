"""The SQLite store: queue and state in one WAL-mode file.

The file is reached through :class:`~conveyor.store.sqlite_commit.GroupCommit`: the writes made
during one turn of the event loop share one transaction, committed before any caller resumes.
Several processes may share the file (``conveyor serve`` plus ``conveyor worker``): each write
transaction is ``BEGIN IMMEDIATE``, so a claim is atomic across processes.

Every hot statement costs the same with a hundred or a million tasks in the file (the plans are
asserted by ``tests/test_query_plans.py``):

- a claim walks, for each task type it may take, the partial index ``tasks_queue`` (``name,
  priority DESC, run_at, seq`` of queued rows), named with ``INDEXED BY`` so the planner cannot
  choose to sort the queue instead, and stops after the room that type has;
- counts (the queued count behind ``429``, ``/health``, the running count behind per-type
  limits) are read from ``task_counts``, one row per owner, type and status, which every write
  keeps in step in its own transaction (:class:`WriteTally`: deltas summed per transaction,
  written before its commit);
- finishing, heartbeats and progress reach rows by id; lease recovery walks the running rows
  (``(status, seq)``); listing pages walk ``(owner, seq)`` or ``(status, seq)`` newest first and
  stop at a page (a tenant's page of one status steps over other tenants' tasks of that status:
  an index on ``(owner, status, seq)`` would cost every write more than it saves).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import QueueFull, TaskNotFound
from ..rates import Rate
from ..record import TaskRecord
from ..status import TaskStatus, cancel_outcome, require_deletable, require_retryable
from . import sqlite_wake as wake
from .logs import SQLITE_LOGS, SQLiteLogs
from .retention import SQLiteRetention
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
from .sqlite_batches import BATCHES, SQLiteBatches
from .sqlite_commit import GroupCommit
from .sqlite_schedules import SCHEDULES, SQLiteSchedules
from .sqlite_tally import WriteTally
from .sqlite_wake import Doorbell
from .stats import SQLITE_TOTALS, SQLiteStats
from .workers import SQLITE_WORKERS, SQLiteWorkers

SCHEMA_VERSION = 9
_COUNTS = """
CREATE TABLE IF NOT EXISTS task_counts (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (owner, name, status)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks(name, priority DESC, run_at, seq)
    WHERE status = 'queued';
"""
# The recent starts of rate-limited task types (see conveyor.rates): a claim counts a type's
# starts within its period and records its own; older rows are pruned as it goes.
_RATE_STARTS = """
CREATE TABLE IF NOT EXISTS rate_starts (name TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rate_starts_name_at ON rate_starts(name, at);
"""
_SCHEMA = (
    """
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
    result_blob TEXT,
    batch_id TEXT
);
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(worker_id, lease_expires_at)
    WHERE status = 'running';
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_owner_seq ON tasks(owner, seq);
CREATE INDEX IF NOT EXISTS tasks_status_seq ON tasks(status, seq);
"""
    + _COUNTS
    + SCHEDULES
    + BATCHES
    + _RATE_STARTS
    + SQLITE_WORKERS
    + SQLITE_LOGS
    + SQLITE_TOTALS
)

# Each step takes a store from the version before it to its own; a new store gets _SCHEMA.
_MIGRATIONS: dict[int, str] = {
    2: "ALTER TABLE tasks ADD COLUMN result_blob TEXT",
    3: "DROP INDEX IF EXISTS tasks_ready;" + _COUNTS + "DELETE FROM task_counts;"
    "INSERT INTO task_counts SELECT owner, name, status, count(*) FROM tasks "
    "GROUP BY owner, name, status",
    4: SCHEDULES,
    5: "ALTER TABLE tasks ADD COLUMN batch_id TEXT;" + BATCHES + _RATE_STARTS,
    6: SQLITE_WORKERS,
    7: SQLITE_LOGS,
    8: SQLITE_TOTALS,
    9: "DROP INDEX IF EXISTS tasks_batch_status",  # see sqlite_batches.py
}
_WAITING_AND_RUNNING = (
    "SELECT name, status, n FROM task_counts WHERE status IN ('queued', 'running') AND n > 0"
)
_ONE_TYPE = (
    "SELECT id, name, priority, run_at, seq FROM tasks INDEXED BY tasks_queue "
    "WHERE status = 'queued' AND name = ? AND run_at <= ? "
    "ORDER BY priority DESC, run_at, seq LIMIT ?"
)
_RECOVERY = recovery_statements("tasks", now="?1", lost="?2")
_REQUEUE = requeue_statement(
    "tasks",
    param=lambda n: f"?{n}",
    now="?7",
    held="id = ?4 AND status = 'running' AND worker_id = ?5 AND attempts = ?6",
)


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def _claimable(names: int) -> str:
    """The claim's query for ``names`` task types: each type's best queued tasks, walked in its
    own index range (parameters: type, now, room), merged in queue order (parameter: how many)."""
    if names == 1:
        return f"SELECT id, name FROM ({_ONE_TYPE}) LIMIT ?"
    union = " UNION ALL ".join([f"SELECT * FROM ({_ONE_TYPE})"] * names)
    return f"SELECT id, name FROM ({union}) ORDER BY priority DESC, run_at, seq LIMIT ?"


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
        self._counts = WriteTally()
        self._subscribers: list[Callable[[str], None]] = []
        self._queue_watchers: list[Callable[[], None]] = []
        self._db = GroupCommit(
            self.path,
            synchronous=synchronous,
            readers=readers,
            busy_timeout_s=busy_timeout_s,
            hook=self._counts,
        )
        self._write = self._db.write
        self._write_alone = self._db.write_alone
        self._read = self._db.read
        self._schedules = SQLiteSchedules(self)
        self._batches = SQLiteBatches(self)
        self._workers = SQLiteWorkers(self)

    # lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        if not self._db.is_open:
            self._db.open(_migrate)
            doorbell = Doorbell(self.path)
            if doorbell.open(self._rung):
                self._counts.doorbell = doorbell

    async def close(self) -> None:
        doorbell, self._counts.doorbell = self._counts.doorbell, None
        await self._db.close()
        if doorbell is not None:
            doorbell.close()

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(task_id)`` when another process on this file changes a task (``""``:
        too many changed at once to list). Where wake-ups are off, never: waiters poll."""
        self._subscribers.append(callback)

    def watch_queue(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when another process on this file makes a task claimable."""
        self._queue_watchers.append(callback)

    def _rung(self, datagram: bytes) -> None:
        queued, ids = wake.parse(datagram)
        if queued:
            for watcher in self._queue_watchers:
                watcher()
        for callback in self._subscribers:
            for task_id in [""] if ids is None else ids:
                callback(task_id)

    def schedules(self) -> SQLiteSchedules:
        """The schedules kept in this file."""
        return self._schedules

    def batches(self) -> SQLiteBatches:
        """The batches kept in this file."""
        return self._batches

    def workers(self) -> SQLiteWorkers:
        return self._workers

    def stats(self) -> SQLiteStats:
        return SQLiteStats(self)

    def logs(self) -> SQLiteLogs:
        return SQLiteLogs(self)

    def retention(self) -> SQLiteRetention:
        return SQLiteRetention(self)

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
            "max_attempts, timeout_s, created_at, run_at, idempotency_key, batch_id) "
            "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
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
                record.batch_id,
            ),
        )
        assert cur.lastrowid is not None
        record.seq = cur.lastrowid
        self._counts.moved(
            record.id, record.owner, record.name, None, record.status.value, record.batch_id
        )

    def _moved(self, record: TaskRecord, old: str) -> None:
        self._counts.moved(
            record.id, record.owner, record.name, old, record.status.value, record.batch_id
        )

    def _queued(self, conn: sqlite3.Connection) -> int:
        return self._counts.queued(conn)

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
        rates = rates or {}

        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            now = time.time()
            queued: dict[str, int] = {}
            running: dict[str, int] = {}
            for name, status, count in conn.execute(_WAITING_AND_RUNNING):
                counts = queued if status == "queued" else running
                counts[name] = counts.get(name, 0) + count  # summed over owners
            remaining = {name: lim - running.get(name, 0) for name, lim in limits.items()}
            for name, rate in rates.items():
                if queued.get(name, 0) > 0:
                    room = rate.count - _rate_used(conn, name, now - rate.period_s)
                    remaining[name] = min(remaining.get(name, room), room)
            eligible = [  # only the types with queued tasks and room left: one index walk each
                (name, min(n, remaining.get(name, n)))
                for name in names
                if queued.get(name, 0) > 0 and remaining.get(name, 1) > 0
            ]
            if not eligible:
                return []
            params: list[Any] = []
            for name, room in eligible:
                params += (name, now, room)
            params.append(n)
            rows = conn.execute(_claimable(len(eligible)), params).fetchall()
            chosen = choose_claims(rows, remaining, n)
            if not chosen:
                return []
            claimed = conn.execute(
                "UPDATE tasks SET status = 'running', attempts = attempts + 1, worker_id = ?, "
                "lease_expires_at = ?, started_at = ?, progress = 0, message = NULL "
                f"WHERE id IN ({_placeholders(len(chosen))}) RETURNING {COLUMNS}",
                (worker_id, now + lease_s, now, *chosen),
            ).fetchall()
            for row in claimed:
                self._counts.moved(row[1], row[3], row[2], "queued", "running", row[23])
            started = [(row[2], now) for row in claimed if row[2] in rates]
            if started:
                conn.executemany("INSERT INTO rate_starts (name, at) VALUES (?, ?)", started)
                for name in {name for name, _ in started}:
                    conn.execute(
                        "DELETE FROM rate_starts WHERE name = ? AND at <= ?",
                        (name, now - rates[name].period_s),
                    )
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
            self._counts.touched(task_id)
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
            self._counts.touched(task_id)
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
            row = conn.execute(
                "UPDATE tasks SET status = ?, result = ?, result_blob = ?, error = ?, "
                "finished_at = ?, lease_expires_at = NULL, "
                "progress = CASE WHEN ? = 'completed' THEN 100 ELSE progress END "
                "WHERE id = ? AND status = 'running' AND worker_id = ? AND attempts = ? "
                "RETURNING owner, name, batch_id",
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
            ).fetchone()
            if row is None:
                return False
            self._counts.moved(task_id, row[0], row[1], "running", status.value, row[2])
            return True

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
            self._moved(record, "running")
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
            records = [record_from_row(row) for row in rows]
            for record in records:
                self._moved(record, "running")
            return records

        return await self._write(op)

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord:
        def op(conn: sqlite3.Connection) -> TaskRecord:
            current = _fetch(conn, task_id, owner)
            if cancel_outcome(task_id, current.status) is TaskStatus.CANCELLED:
                sql = "status = 'cancelled', finished_at = ?"
                params: tuple[Any, ...] = (time.time(),)
            else:
                sql, params = "cancel_requested = 1", ()
            row = conn.execute(
                f"UPDATE tasks SET {sql} WHERE id = ? RETURNING {COLUMNS}", (*params, task_id)
            ).fetchone()
            record = record_from_row(row)
            self._moved(record, current.status.value)
            return record

        return await self._write(op)

    async def retry(self, task_id: str, *, owner: str | None, attempts: int) -> TaskRecord:
        def op(conn: sqlite3.Connection) -> TaskRecord:
            current = _fetch(conn, task_id, owner)
            require_retryable(task_id, current.status)
            row = conn.execute(
                f"UPDATE tasks SET {retry_set('?', '?')} WHERE id = ? RETURNING {COLUMNS}",
                (attempts, time.time(), task_id),
            ).fetchone()
            self._counts.moved(
                task_id,
                current.owner,
                current.name,
                current.status.value,
                "queued",
                current.batch_id,
            )
            return record_from_row(row)

        return await self._write(op)

    async def delete(self, task_id: str, *, owner: str | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            current = _fetch(conn, task_id, owner)
            require_deletable(task_id, current.status)
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            self._counts.moved(
                task_id, current.owner, current.name, current.status.value, None, current.batch_id
            )

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
        narrowed: TaskFilter = NO_FILTER,
    ) -> list[TaskRecord]:
        def fetch(sql: str, param: int | None) -> Any:
            args = () if param is None else (param,)
            return self._read(lambda conn: conn.execute(sql, args).fetchone())

        bounds = await seq_range(narrowed, "tasks", fetch, "?")
        sql, params = list_query(
            "tasks",
            lambda _: "?",
            owner=owner,
            status=status,
            name=name,
            limit=limit,
            before_seq=before_seq,
            narrowed=narrowed,
            seq_range=bounds,
            by_id="INDEXED BY sqlite_autoindex_tasks_1",  # the id's UNIQUE constraint
            by_key="INDEXED BY tasks_idempotency",
        )
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        return [record_from_row(row) for row in rows]

    async def rate_used(self, name: str, rate: Rate) -> int:
        return await self._read(lambda conn: _rate_used(conn, name, time.time() - rate.period_s))

    async def count_by_status(self, *, owner: str | None = None) -> dict[str, int]:
        where, params = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT status, sum(n) FROM task_counts {where} GROUP BY status", params
            ).fetchall()
        )
        return {status.value: 0 for status in TaskStatus} | dict(rows)


def _rate_used(conn: sqlite3.Connection, name: str, since: float) -> int:
    (used,) = conn.execute(
        "SELECT count(*) FROM rate_starts WHERE name = ? AND at > ?", (name, since)
    ).fetchone()
    return int(used)


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
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
