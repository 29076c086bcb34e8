"""The per-transaction tally of the SQLite store: what each write transaction moved, summed into
``task_counts`` and ``batch_counts`` before its commit, and rung to the other processes after."""

from __future__ import annotations

import sqlite3
import threading
import time

from . import sqlite_wake as wake
from .sqlite_batches import BATCH_ADD, BATCH_FINISHED, BATCH_NEW
from .sqlite_wake import Doorbell

_ADD = "UPDATE task_counts SET n = n + ? WHERE owner = ? AND name = ? AND status = ?"
_NEW_COUNT = "INSERT INTO task_counts (owner, name, status, n) VALUES (?, ?, ?, ?)"


class WriteTally:
    """What each write transaction changed: each write request tells it the tasks it touched
    and the moves it made (a task of this owner and type from one status to another). Before
    the commit the transaction writes the moves' sum per (owner, type, status) to
    ``task_counts``; after it, the other processes on the file are told which tasks changed and
    whether one became claimable (:class:`~conveyor.store.sqlite_wake.Doorbell`). Transactions
    run on the event loop's thread or the writer thread, so a tally is kept per thread."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.doorbell: Doorbell | None = None

    def begin(self) -> None:
        self._local.deltas = {}
        self._local.batches = {}
        self._local.touched = []
        self._local.queued = False
        self._local.queued_before = None

    def touched(self, task_id: str) -> None:
        self._local.touched.append(task_id)

    def moved(
        self,
        task_id: str,
        owner: str,
        name: str,
        old: str | None,
        new: str | None,
        batch_id: str | None = None,
    ) -> None:
        self._local.touched.append(task_id)
        deltas: dict[tuple[str, str, str], int] = self._local.deltas
        if old == new:
            return
        if old is not None:
            deltas[owner, name, old] = deltas.get((owner, name, old), 0) - 1
        if new is not None:
            deltas[owner, name, new] = deltas.get((owner, name, new), 0) + 1
            if new == "queued":
                self._local.queued = True
        if batch_id is not None:
            batches: dict[tuple[str, str], int] = self._local.batches
            if old is not None:
                batches[batch_id, old] = batches.get((batch_id, old), 0) - 1
            if new is not None:
                batches[batch_id, new] = batches.get((batch_id, new), 0) + 1

    def added(
        self, owner: str, name: str, status: str, batch_id: str | None, ids: list[str]
    ) -> None:
        """New tasks ``ids``, all of one owner, type, status and batch."""
        self._local.touched.extend(ids)
        deltas: dict[tuple[str, str, str], int] = self._local.deltas
        deltas[owner, name, status] = deltas.get((owner, name, status), 0) + len(ids)
        if status == "queued":
            self._local.queued = True
        if batch_id is not None:
            batches: dict[tuple[str, str], int] = self._local.batches
            batches[batch_id, status] = batches.get((batch_id, status), 0) + len(ids)

    def queued(self, conn: sqlite3.Connection) -> int:
        """How many tasks are queued, as this transaction sees them: read from the table once
        per transaction, plus what the transaction moved since."""
        if self._local.queued_before is None:
            (self._local.queued_before,) = conn.execute(
                "SELECT coalesce(sum(n), 0) FROM task_counts WHERE status = 'queued'"
            ).fetchone()
        deltas: dict[tuple[str, str, str], int] = self._local.deltas
        moved = sum(n for (_, _, status), n in deltas.items() if status == "queued")
        return int(self._local.queued_before) + moved

    def before_commit(self, conn: sqlite3.Connection) -> None:
        deltas: dict[tuple[str, str, str], int] = self._local.deltas
        if deltas:
            for (owner, name, status), n in deltas.items():
                if n and not conn.execute(_ADD, (n, owner, name, status)).rowcount:
                    conn.execute(_NEW_COUNT, (owner, name, status, n))
            deltas.clear()
        batches: dict[tuple[str, str], int] = self._local.batches
        if batches:
            for (batch_id, status), n in batches.items():
                if n and not conn.execute(BATCH_ADD, (n, batch_id, status)).rowcount:
                    conn.execute(BATCH_NEW, (batch_id, status, n))
            now = time.time()
            for batch_id in {batch_id for batch_id, _ in batches}:
                conn.execute(BATCH_FINISHED, (batch_id, now))
            batches.clear()

    def after_commit(self) -> None:
        touched: list[str] = self._local.touched
        if touched and self.doorbell is not None and self.doorbell.peers():
            self.doorbell.ring(wake.message(touched, self._local.queued))
        self._local.touched = []
