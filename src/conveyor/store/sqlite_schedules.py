"""Schedules and their fires in the SQLite file.

A fire is a row keyed ``(schedule_id, fire_at)``, inserted in the same transaction as the task it
creates and as the move of the schedule's next fire time: a second process trying the same fire
inserts nothing and creates nothing, so each planned fire happens once whatever the number of
processes (no leader).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from ..errors import ScheduleConflict, ScheduleNotFound
from ..record import TaskRecord
from ..schedule_record import SKIPPED_OVERLAP, TRIGGERED, FireRecord, ScheduleRecord
from .rows import SCHEDULE_COLUMNS as _COLUMNS
from .rows import SCHEDULE_FIELDS as _FIELDS
from .rows import SCHEDULE_MUTABLE as _MUTABLE
from .rows import schedule_from_row as _record
from .rows import schedule_row as _row

T = TypeVar("T")


class _File(Protocol):
    """What schedules need of the SQLite store: its group-committed writes, its reads, and its
    task insert (counted and rung like any other)."""

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...

    def _check_room(self, conn: sqlite3.Connection, n: int, max_queued: int | None) -> None: ...

    def _insert_row(self, conn: sqlite3.Connection, record: TaskRecord, args_json: str) -> None: ...


SCHEDULES = """
CREATE TABLE IF NOT EXISTS schedules (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    cron TEXT,
    every_s REAL,
    timezone TEXT NOT NULL,
    start_at REAL,
    end_at REAL,
    jitter_s REAL NOT NULL,
    misfire TEXT NOT NULL,
    max_lateness_s REAL NOT NULL,
    overlap TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    from_code INTEGER NOT NULL,
    next_fire_at REAL,
    due_at REAL,
    last_task_id TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (owner, name)
);
CREATE INDEX IF NOT EXISTS schedules_due ON schedules(due_at) WHERE due_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS schedule_fires (
    schedule_id TEXT NOT NULL,
    fire_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    task_id TEXT,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (schedule_id, fire_at)
) WITHOUT ROWID;
"""


def _move_on(
    conn: sqlite3.Connection, schedule: ScheduleRecord, next_fire_at: float | None
) -> None:
    """Plan the schedule's next fire (due only while it is enabled: a pause saved meanwhile
    stands)."""
    conn.execute(
        "UPDATE schedules SET next_fire_at = ?, due_at = CASE WHEN enabled THEN ? END WHERE id = ?",
        (
            next_fire_at,
            ScheduleRecord.due_at_of(schedule.id, schedule.jitter_s, next_fire_at),
            schedule.id,
        ),
    )


class SQLiteSchedules:
    """The schedules of one SQLite store (the ``ScheduleStore`` protocol)."""

    def __init__(self, store: _File) -> None:
        self._store = store

    async def now(self) -> float:
        """The clock that decides fire times: this host's, shared by every process on the file."""
        return time.time()

    async def create(self, record: ScheduleRecord) -> ScheduleRecord:
        def op(conn: sqlite3.Connection) -> ScheduleRecord:
            try:
                conn.execute(
                    f"INSERT INTO schedules ({_FIELDS}, due_at) "
                    f"VALUES ({','.join('?' * (len(_COLUMNS) + 1))})",
                    [*_row(record), record.due_at()],
                )
            except sqlite3.IntegrityError:
                raise ScheduleConflict(f"a schedule named {record.name!r} exists") from None
            return record

        return await self._store._write(op)

    async def save(self, record: ScheduleRecord) -> ScheduleRecord:
        """Write every field but the id, owner and creation time of an existing schedule."""

        def op(conn: sqlite3.Connection) -> ScheduleRecord:
            values = dict(zip(_COLUMNS, _row(record), strict=True))
            sets = ", ".join(f"{c} = ?" for c in _MUTABLE)
            cur = conn.execute(
                f"UPDATE schedules SET {sets}, due_at = ? WHERE id = ? AND owner = ?",
                [*(values[c] for c in _MUTABLE), record.due_at(), record.id, record.owner],
            )
            if cur.rowcount != 1:
                raise ScheduleNotFound(f"no schedule with id {record.id}")
            return record

        return await self._store._write(op)

    async def get(self, schedule_id: str, *, owner: str | None) -> ScheduleRecord:
        def read(conn: sqlite3.Connection) -> ScheduleRecord:
            row = conn.execute(
                f"SELECT {_FIELDS} FROM schedules WHERE id = ?", (schedule_id,)
            ).fetchone()
            if row is None or (owner is not None and row[1] != owner):
                raise ScheduleNotFound(f"no schedule with id {schedule_id}")
            return _record(row)

        return await self._store._read(read)

    async def by_name(self, name: str, *, owner: str) -> ScheduleRecord | None:
        def read(conn: sqlite3.Connection) -> ScheduleRecord | None:
            row = conn.execute(
                f"SELECT {_FIELDS} FROM schedules WHERE owner = ? AND name = ?", (owner, name)
            ).fetchone()
            return None if row is None else _record(row)

        return await self._store._read(read)

    async def list_schedules(self, *, owner: str | None) -> list[ScheduleRecord]:
        where, params = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())

        def read(conn: sqlite3.Connection) -> list[ScheduleRecord]:
            rows = conn.execute(
                f"SELECT {_FIELDS} FROM schedules {where} ORDER BY name", params
            ).fetchall()
            return [_record(row) for row in rows]

        return await self._store._read(read)

    async def delete(self, schedule_id: str, *, owner: str | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT owner FROM schedules WHERE id = ?", (schedule_id,)
            ).fetchone()
            if row is None or (owner is not None and row[0] != owner):
                raise ScheduleNotFound(f"no schedule with id {schedule_id}")
            conn.execute("DELETE FROM schedule_fires WHERE schedule_id = ?", (schedule_id,))
            conn.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,))

        await self._store._write(op)

    async def due(self, now: float, limit: int = 100) -> list[ScheduleRecord]:
        """Enabled schedules whose next fire (with its jitter) is due at ``now``."""

        def read(conn: sqlite3.Connection) -> list[ScheduleRecord]:
            rows = conn.execute(
                f"SELECT {_FIELDS} FROM schedules WHERE due_at <= ? ORDER BY due_at LIMIT ?",
                (now, limit),
            ).fetchall()
            return [_record(row) for row in rows]

        return await self._store._read(read)

    async def next_due(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            (due,) = conn.execute("SELECT min(due_at) FROM schedules").fetchone()
            return None if due is None else float(due)

        return await self._store._read(read)

    async def fire(
        self,
        schedule: ScheduleRecord,
        fire_at: float,
        outcome: str,
        *,
        task: tuple[TaskRecord, str] | None,
        missed: list[float],
        next_fire_at: float | None,
        max_queued: int | None,
    ) -> tuple[str, TaskRecord | None] | None:
        """Record one planned fire of ``schedule`` and create its task, in one transaction;
        None when another process recorded it first (or moved the schedule on). A ``triggered``
        fire leaves the planned fires alone. ``missed`` fires are recorded as such."""
        store = self._store

        def op(conn: sqlite3.Connection) -> tuple[str, TaskRecord | None] | None:
            row = conn.execute(
                "SELECT next_fire_at, last_task_id FROM schedules WHERE id = ?", (schedule.id,)
            ).fetchone()
            if row is None:
                return None
            planned, last_task_id = row
            if outcome != TRIGGERED and planned != schedule.next_fire_at:
                return None  # another process fired it and moved the schedule on
            now = time.time()
            inserted = conn.execute(
                "INSERT INTO schedule_fires (schedule_id, fire_at, outcome, task_id, "
                "recorded_at) VALUES (?, ?, ?, NULL, ?) ON CONFLICT DO NOTHING",
                (schedule.id, fire_at, outcome, now),
            ).rowcount
            if not inserted:  # recorded already: a change saved over the move put it back
                if outcome != TRIGGERED:
                    _move_on(conn, schedule, next_fire_at)
                return None
            conn.executemany(
                "INSERT INTO schedule_fires (schedule_id, fire_at, outcome, task_id, "
                "recorded_at) VALUES (?, ?, 'missed', NULL, ?) ON CONFLICT DO NOTHING",
                [(schedule.id, moment, now) for moment in missed],
            )
            result, created, creating = outcome, None, task
            if creating is not None and schedule.overlap == "skip_if_running" and last_task_id:
                busy = conn.execute(
                    "SELECT 1 FROM tasks WHERE id = ? AND status IN ('queued', 'running')",
                    (last_task_id,),
                ).fetchone()
                if busy:
                    result, creating = SKIPPED_OVERLAP, None
            if creating is not None:
                record, args_json = creating
                store._check_room(conn, 1, max_queued)
                store._insert_row(conn, record, args_json)
                created = record
            conn.execute(
                "UPDATE schedule_fires SET outcome = ?, task_id = ? "
                "WHERE schedule_id = ? AND fire_at = ?",
                (result, created.id if created else None, schedule.id, fire_at),
            )
            if outcome != TRIGGERED:
                _move_on(conn, schedule, next_fire_at)
            if created is not None:
                conn.execute(
                    "UPDATE schedules SET last_task_id = ? WHERE id = ?", (created.id, schedule.id)
                )
            return result, created

        return await store._write(op)

    async def fires(
        self, schedule_id: str, *, limit: int, before: float | None
    ) -> list[FireRecord]:
        """The schedule's fires, latest first."""

        def read(conn: sqlite3.Connection) -> list[FireRecord]:
            rows = conn.execute(
                "SELECT schedule_id, fire_at, outcome, task_id, recorded_at FROM schedule_fires "
                "WHERE schedule_id = ? AND fire_at < ? ORDER BY fire_at DESC LIMIT ?",
                (schedule_id, float("inf") if before is None else before, limit),
            ).fetchall()
            return [FireRecord(*row) for row in rows]

        return await self._store._read(read)
