"""Group commit on a SQLite file: how the SQLite store reaches its file, from the event loop.

Writes are grouped: the requests made during one turn of the event loop run in one transaction,
and each caller's future resolves only after that commit. With ``synchronous=NORMAL`` a commit
does not wait for the disk, so the batch runs on the event loop's own connection (measured: a
thread hand-off per batch cost 15-25 % of ``POST /tasks`` throughput), and reads of single
records run there too. Whenever the file is locked by another process (or ``synchronous=FULL``
makes commits wait for the disk), batches go to a writer thread that waits for the lock instead
of the loop. A long write (a big batch's rows) runs on the writer thread in a transaction of its
own (``write_alone``). The writer thread also checkpoints the WAL, which the loop's connection
never does.
Other reads run on a small read pool.

Each write transaction is ``BEGIN IMMEDIATE``, so several processes may share the file.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import ConveyorError, InsufficientStorage, StoreUnavailable

T = TypeVar("T")

_MAX_BATCH = 512
_CHECKPOINT_S = 1.0


class _Busy(Exception):
    """The file is write-locked by another connection; ``done`` ran, ``rest`` did not."""

    def __init__(self, done: list[Any], rest: list[Any]) -> None:
        super().__init__("database is locked")
        self.done = done
        self.rest = rest


def _connect(path: Path, synchronous: str, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class TransactionHook(Protocol):
    """What a store does at the edges of each write transaction."""

    def begin(self) -> None: ...

    def before_commit(self, conn: sqlite3.Connection) -> None: ...

    def after_commit(self) -> None: ...


_Request = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


class _Alone(tuple):  # type: ignore[type-arg]
    """A request that runs in a transaction of its own (see :meth:`GroupCommit.write_alone`)."""

    __slots__ = ()


class GroupCommit:
    """The connections to one SQLite file: the loop's, a writer thread's, and a read pool.

    Args:
        path: the database file.
        synchronous: ``PRAGMA synchronous`` (``FULL`` sends every write to the writer thread).
        readers: threads (and connections) of the read pool.
        busy_timeout_s: how long a write waits for another process's lock, then fails.
        hook: told when each write transaction begins, before it commits and after, on the
            thread that runs it (the store writes what the transaction's requests tallied, then
            tells the other processes).
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        readers: int = 2,
        busy_timeout_s: float = 30.0,
        hook: TransactionHook | None = None,
    ) -> None:
        self.path = path
        self._hook = hook
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self.inline = synchronous != "FULL"
        self.loop_conn: sqlite3.Connection | None = None
        self._pending: list[_Request] = []
        self._readers = readers
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._read_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    def open(self, prepare: Callable[[sqlite3.Connection], None]) -> None:
        """Connect (``prepare`` runs first on the writer's connection: the schema)."""
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path, self._synchronous, self._busy_timeout_s)
            prepare(conn)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="conveyor-sqlite-writer", daemon=True
        )
        self._writer.start()
        self._read_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="conveyor-read")
        loop_conn = _connect(self.path, self._synchronous, self._busy_timeout_s)
        loop_conn.execute("PRAGMA busy_timeout=0")  # never wait for a lock on the event loop
        loop_conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints
        self.loop_conn = loop_conn

    async def close(self) -> None:
        if self._writer is None:
            return
        if self._pending:
            self._flush()
        self._requests.put(None)
        await asyncio.to_thread(self._writer.join)
        self._writer = None
        if self.loop_conn is not None:
            self.loop_conn.close()
            self.loop_conn = None
        assert self._read_pool is not None
        self._read_pool.shutdown(wait=True)
        self._read_pool = None
        with self._read_lock:
            for conn in self._read_conns:
                conn.close()
            self._read_conns.clear()
        self._local = threading.local()

    def write(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``op`` in the next group's transaction; the future resolves after its commit."""
        if self._writer is None or self._loop is None:
            raise StoreUnavailable("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        if self.inline:
            if not self._pending:
                self._loop.call_soon(self._flush)
            self._pending.append((op, future))
        else:
            self._requests.put((op, future))
        return future

    def write_alone(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``op`` on the writer thread in a transaction of its own: for a long write (a big
        batch's rows) that must not hold the event loop, nor be undone and run again because
        another request of its group failed."""
        if self._writer is None or self._loop is None:
            raise StoreUnavailable("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._requests.put(_Alone((op, future)))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        assert self.loop_conn is not None
        try:
            outcomes = self._run_batch(self.loop_conn, batch, busy_raises=True)
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
                batches, stop = self._group(first)
                for batch in batches:
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

    def _group(self, first: _Request) -> tuple[list[list[_Request]], bool]:
        """The requests waiting after ``first``, grouped: each group one transaction (a request
        to run alone is a group of its own); and whether the writer is asked to stop."""
        groups = [[first]]
        stop = False
        while len(groups[-1]) < _MAX_BATCH:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            if isinstance(item, _Alone) or isinstance(groups[-1][0], _Alone):
                groups.append([item])
            else:
                groups[-1].append(item)
        return groups, stop

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[_Request], *, busy_raises: bool = False
    ) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if busy_raises and exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _Busy([], batch) from exc
            return [(future, False, _translate(exc)) for _, future in batch]
        if self._hook is not None:
            self._hook.begin()
        try:
            results = [(future, True, op(conn)) for op, future in batch]
            if self._hook is not None:
                self._hook.before_commit(conn)
            conn.execute("COMMIT")
        except Exception as exc:  # one request failed: undo the batch, then run each alone
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                return [(batch[0][1], False, _translate(exc))]
        else:
            if self._hook is not None:
                self._hook.after_commit()
            return results
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
            conn = _connect(self.path, self._synchronous, self._busy_timeout_s)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._read_lock:
                self._read_conns.append(conn)
        return conn

    async def read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._read_pool is None or self._loop is None:
            raise StoreUnavailable("the store is not open")

        def run() -> T:
            try:
                return op(self._read_conn())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite read failed: {exc}") from exc

        return await self._loop.run_in_executor(self._read_pool, run)


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, ConveyorError):
        return exc
    if isinstance(exc, sqlite3.Error):
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            failure: ConveyorError = InsufficientStorage(
                f"no room on the server's disk: the store cannot grow ({exc})"
            )
        else:
            failure = StoreUnavailable(f"SQLite write failed: {exc}")
        failure.__cause__ = exc
        return failure
    return exc


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
