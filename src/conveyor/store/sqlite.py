"""The SQLite store: queue and state in one WAL-mode file.

Writes are grouped (group commit): the requests made during one turn of the event loop run in one
transaction, and each caller's future resolves only after that commit. With
``synchronous=NORMAL`` a commit does not wait for the disk, so the batch runs on the event loop's
own connection (measured: a thread hand-off per batch cost 15-25 % of ``POST /tasks`` throughput),
and reads of single records run there too. Whenever the file is locked by another process (or
``synchronous=FULL`` makes commits wait for the disk), batches go to a writer thread that waits
for the lock instead of the loop. The writer thread also checkpoints the WAL, which the loop's
connection never does. List queries run on a small read pool.

Several processes may share the file (``conveyor serve`` plus ``conveyor worker``): each write
transaction is ``BEGIN IMMEDIATE``, so a claim is atomic across processes.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..errors import (
    ConveyorError,
    QueueFull,
    StoreUnavailable,
    TaskNotFound,
    TaskStateConflict,
)
from ..record import TaskRecord
from ..status import RETRYABLE, TERMINAL, TaskStatus
from .rows import COLUMNS, WORKER_LOST, dump, list_query, record_from_row

T = TypeVar("T")

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
_MAX_BATCH = 512
_QUEUED_RECOUNT_S = 0.25
_CHECKPOINT_S = 1.0


class _Busy(Exception):
    """The file is write-locked by another connection; ``done`` ran, ``rest`` did not."""

    def __init__(self, done: list[Any], rest: list[Any]) -> None:
        super().__init__("database is locked")
        self.done = done
        self.rest = rest


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


_Request = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class SQLiteStore:
    """Task records in a SQLite file (WAL). See the module docstring for the threading model."""

    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL", readers: int = 2) -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._inline = synchronous != "FULL"
        self._loop_conn: sqlite3.Connection | None = None
        self._pending: list[_Request] = []
        self._readers = readers
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._read_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued_count = 0
        self._queued_counted_at = 0.0

    # lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path, self._synchronous)
            _migrate(conn)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="conveyor-sqlite-writer", daemon=True
        )
        self._writer.start()
        self._read_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="conveyor-read")
        loop_conn = _connect(self.path, self._synchronous)
        loop_conn.execute("PRAGMA busy_timeout=0")  # never wait for a lock on the event loop
        loop_conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints
        self._loop_conn = loop_conn

    async def close(self) -> None:
        if self._writer is None:
            return
        if self._pending:
            self._flush()
        self._requests.put(None)
        await asyncio.to_thread(self._writer.join)
        self._writer = None
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None
        assert self._read_pool is not None
        self._read_pool.shutdown(wait=True)
        self._read_pool = None
        with self._read_lock:
            for conn in self._read_conns:
                conn.close()
            self._read_conns.clear()
        self._local = threading.local()

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """SQLite has no cross-process notifications: waiters in other processes poll."""

    # plumbing ----------------------------------------------------------------------------------

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._writer is None or self._loop is None:
            raise StoreUnavailable("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        if self._inline:
            if not self._pending:
                self._loop.call_soon(self._flush)
            self._pending.append((op, future))
        else:
            self._requests.put((op, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        assert self._loop_conn is not None
        try:
            outcomes = self._run_batch(self._loop_conn, batch, busy_raises=True)
        except _Busy as busy:  # another process holds the lock: the writer thread waits for it
            outcomes = busy.done
            for item in busy.rest:
                self._requests.put(item)
        _deliver(outcomes)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        checkpointed = time.monotonic()
        try:
            while True:
                try:
                    first = self._requests.get(timeout=_CHECKPOINT_S)
                    idle = False
                except queue.Empty:
                    first, idle = None, True
                if time.monotonic() - checkpointed >= _CHECKPOINT_S:
                    _checkpoint(conn)
                    checkpointed = time.monotonic()
                if idle:
                    continue
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                outcomes = self._run_batch(conn, batch)
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(_deliver, outcomes)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
                if stop:
                    return
        finally:
            _checkpoint(conn)
            conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[_Request], *, busy_raises: bool = False
    ) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if busy_raises and exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _Busy([], batch) from exc
            return [(future, False, _translate(exc)) for _, future in batch]
        try:
            results = [(future, True, op(conn)) for op, future in batch]
            conn.execute("COMMIT")
            return results
        except Exception as exc:  # one request failed: undo the batch, then run each alone
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                return [(batch[0][1], False, _translate(exc))]
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        for index, item in enumerate(batch):
            try:
                outcomes.extend(self._run_batch(conn, [item], busy_raises=busy_raises))
            except _Busy as busy:
                raise _Busy(outcomes, batch[index:]) from busy
        return outcomes

    def _read_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self._synchronous)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._read_lock:
                self._read_conns.append(conn)
        return conn

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._read_pool is None or self._loop is None:
            raise StoreUnavailable("the store is not open")

        def run() -> T:
            try:
                return op(self._read_conn())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite read failed: {exc}") from exc

        return await self._loop.run_in_executor(self._read_pool, run)

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
            if max_queued is not None and self._queued(conn) >= max_queued:
                raise QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)
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
            return record, True

        return await self._write(op)

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
            chosen: list[str] = []
            for task_id, name in rows:
                if name in remaining:
                    if remaining[name] <= 0:
                        continue
                    remaining[name] -= 1
                chosen.append(task_id)
                if len(chosen) == n:
                    break
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
        run_at: float,
        error: dict[str, Any] | None,
        refund_attempt: bool,
    ) -> TaskRecord | None:
        error_json = dump(error)

        def op(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(
                "UPDATE tasks SET status = 'queued', run_at = ?, error = ?, worker_id = NULL, "
                "lease_expires_at = NULL, attempts = attempts - ? "
                "WHERE id = ? AND status = 'running' AND worker_id = ? AND attempts = ? "
                f"RETURNING {COLUMNS}",
                (run_at, error_json, int(refund_attempt), task_id, worker_id, attempt),
            ).fetchone()
            if row is None:
                return None
            self._queued_count += 1
            return record_from_row(row)

        return await self._write(op)

    async def heartbeat(self, worker_id: str, lease_s: float) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "UPDATE tasks SET lease_expires_at = ? WHERE status = 'running' "
                "AND worker_id = ? RETURNING id, cancel_requested",
                (time.time() + lease_s, worker_id),
            ).fetchall()
            return [task_id for task_id, cancel in rows if cancel]

        return await self._write(op)

    async def recover_expired(self) -> list[TaskRecord]:
        lost = dump(WORKER_LOST)

        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            now = time.time()
            expired = "status = 'running' AND lease_expires_at < ?"
            rows = conn.execute(
                "UPDATE tasks SET status = 'cancelled', finished_at = ?, lease_expires_at = NULL "
                f"WHERE {expired} AND cancel_requested = 1 RETURNING {COLUMNS}",
                (now, now),
            ).fetchall()
            rows += conn.execute(
                "UPDATE tasks SET status = 'queued', run_at = ?, error = ?, worker_id = NULL, "
                f"lease_expires_at = NULL WHERE {expired} AND attempts < max_attempts "
                f"RETURNING {COLUMNS}",
                (now, lost, now),
            ).fetchall()
            rows += conn.execute(
                "UPDATE tasks SET status = 'failed', error = ?, finished_at = ?, "
                f"lease_expires_at = NULL WHERE {expired} RETURNING {COLUMNS}",
                (lost, now, now),
            ).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._write(op)

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord:
        def op(conn: sqlite3.Connection) -> TaskRecord:
            current = _fetch(conn, task_id, owner)
            if current.status is TaskStatus.QUEUED:
                sql = "status = 'cancelled', finished_at = ?"
                params: tuple[Any, ...] = (time.time(),)
                self._queued_count -= 1
            elif current.status is TaskStatus.RUNNING:
                sql, params = "cancel_requested = 1", ()
            else:
                raise TaskStateConflict(
                    f"task {task_id} is already {current.status.value}; it cannot be cancelled"
                )
            row = conn.execute(
                f"UPDATE tasks SET {sql} WHERE id = ? RETURNING {COLUMNS}", (*params, task_id)
            ).fetchone()
            return record_from_row(row)

        return await self._write(op)

    async def retry(self, task_id: str, *, owner: str | None, attempts: int) -> TaskRecord:
        def op(conn: sqlite3.Connection) -> TaskRecord:
            current = _fetch(conn, task_id, owner)
            if current.status not in RETRYABLE:
                raise TaskStateConflict(
                    f"task {task_id} is {current.status.value}; only failed or cancelled tasks "
                    "can be retried"
                )
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
            if current.status not in TERMINAL:
                raise TaskStateConflict(
                    f"task {task_id} is {current.status.value}; cancel it or wait until it ends"
                )
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))

        await self._write(op)

    # reads -------------------------------------------------------------------------------------

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        if self._inline and self._loop_conn is not None:
            try:  # a point read by primary key: cheaper here than a thread hand-off
                return _fetch(self._loop_conn, task_id, owner)
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

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT status, count(*) FROM tasks GROUP BY status"
            ).fetchall()
        )
        return {status.value: 0 for status in TaskStatus} | dict(rows)


def _fetch(conn: sqlite3.Connection, task_id: str, owner: str | None) -> TaskRecord:
    row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None or (owner is not None and row[3] != owner):
        raise TaskNotFound(f"no task with id {task_id}")
    return record_from_row(row)


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, sqlite3.Error):
        failure = StoreUnavailable(f"SQLite write failed: {exc}")
        failure.__cause__ = exc
        return failure
    return exc


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


def _checkpoint(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error:  # a checkpoint is an optimisation; the next one catches up
        pass


def _deliver(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
