"""Schedules and their fires in PostgreSQL, shared by every process of a deployment.

As in the SQLite file, a fire is a row keyed ``(schedule_id, fire_at)``, inserted in the same
transaction as the task it creates and as the move of the schedule's next fire time. The
schedule's row is locked (``FOR UPDATE``) for that transaction: a second process trying the same
fire waits, then finds the schedule moved on and creates nothing. Fire times are judged by the
database's clock (:meth:`PostgresSchedules.now`), so hosts with skewed clocks agree.
"""

from __future__ import annotations

import asyncpg

from ..errors import QueueFull, ScheduleConflict, ScheduleNotFound
from ..record import TaskRecord
from ..schedule_record import SKIPPED_OVERLAP, TRIGGERED, FireRecord, ScheduleRecord
from .postgres_sql import NOW, TaskInserter
from .rows import (
    SCHEDULE_COLUMNS,
    SCHEDULE_FIELDS,
    SCHEDULE_MUTABLE,
    schedule_from_row,
)
from .rows import schedule_row as _row

SCHEDULES = """
CREATE TABLE IF NOT EXISTS conveyor_schedules (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    cron TEXT,
    every_s DOUBLE PRECISION,
    timezone TEXT NOT NULL,
    start_at DOUBLE PRECISION,
    end_at DOUBLE PRECISION,
    jitter_s DOUBLE PRECISION NOT NULL,
    misfire TEXT NOT NULL,
    max_lateness_s DOUBLE PRECISION NOT NULL,
    overlap TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    from_code BOOLEAN NOT NULL,
    next_fire_at DOUBLE PRECISION,
    due_at DOUBLE PRECISION,
    last_task_id TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    UNIQUE (owner, name)
);
CREATE INDEX IF NOT EXISTS conveyor_schedules_due ON conveyor_schedules (due_at)
    WHERE due_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS conveyor_schedule_fires (
    schedule_id TEXT NOT NULL,
    fire_at DOUBLE PRECISION NOT NULL,
    outcome TEXT NOT NULL,
    task_id TEXT,
    recorded_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (schedule_id, fire_at)
);
"""

_PARAMS = ", ".join(f"${n}" for n in range(1, len(SCHEDULE_COLUMNS) + 2))


async def _move_on(
    conn: asyncpg.Connection, schedule: ScheduleRecord, next_fire_at: float | None
) -> None:
    """Plan the schedule's next fire (due only while it is enabled: a pause saved meanwhile
    stands)."""
    await conn.execute(
        "UPDATE conveyor_schedules SET next_fire_at = $1, "
        "due_at = CASE WHEN enabled THEN $2::float8 END WHERE id = $3",
        next_fire_at,
        ScheduleRecord.due_at_of(schedule.id, schedule.jitter_s, next_fire_at),
        schedule.id,
    )


class PostgresSchedules:
    """The :class:`~conveyor.store.base.ScheduleStore` of a PostgreSQL store."""

    def __init__(self, store: TaskInserter) -> None:
        self._store = store

    async def now(self) -> float:
        """The database's clock: every host judges fire times by it."""
        async with self._store.connection() as conn:
            return float(await conn.fetchval(f"SELECT {NOW}"))

    async def create(self, record: ScheduleRecord) -> ScheduleRecord:
        async with self._store.connection() as conn:
            try:
                await conn.execute(
                    f"INSERT INTO conveyor_schedules ({SCHEDULE_FIELDS}, due_at) "
                    f"VALUES ({_PARAMS})",
                    *_row(record),
                    record.due_at(),
                )
            except asyncpg.UniqueViolationError:
                raise ScheduleConflict(f"a schedule named {record.name!r} exists") from None
        return record

    async def save(self, record: ScheduleRecord) -> ScheduleRecord:
        """Write every field but the id, owner and creation time of an existing schedule."""
        values = dict(zip(SCHEDULE_COLUMNS, _row(record), strict=True))
        sets = ", ".join(f"{c} = ${n}" for n, c in enumerate(SCHEDULE_MUTABLE, 1))
        n = len(SCHEDULE_MUTABLE)
        async with self._store.connection() as conn:
            try:
                done = await conn.execute(
                    f"UPDATE conveyor_schedules SET {sets}, due_at = ${n + 1} "
                    f"WHERE id = ${n + 2} AND owner = ${n + 3}",
                    *(values[c] for c in SCHEDULE_MUTABLE),
                    record.due_at(),
                    record.id,
                    record.owner,
                )
            except asyncpg.UniqueViolationError:
                raise ScheduleConflict(f"a schedule named {record.name!r} exists") from None
        if done != "UPDATE 1":
            raise ScheduleNotFound(f"no schedule with id {record.id}")
        return record

    async def get(self, schedule_id: str, *, owner: str | None) -> ScheduleRecord:
        async with self._store.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {SCHEDULE_FIELDS} FROM conveyor_schedules WHERE id = $1", schedule_id
            )
        if row is None or (owner is not None and row["owner"] != owner):
            raise ScheduleNotFound(f"no schedule with id {schedule_id}")
        return schedule_from_row(row)

    async def by_name(self, name: str, *, owner: str) -> ScheduleRecord | None:
        async with self._store.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {SCHEDULE_FIELDS} FROM conveyor_schedules WHERE owner = $1 AND name = $2",
                owner,
                name,
            )
        return None if row is None else schedule_from_row(row)

    async def list_schedules(self, *, owner: str | None) -> list[ScheduleRecord]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {SCHEDULE_FIELDS} FROM conveyor_schedules "
                "WHERE $1::text IS NULL OR owner = $1 ORDER BY name",
                owner,
            )
        return [schedule_from_row(row) for row in rows]

    async def delete(self, schedule_id: str, *, owner: str | None) -> None:
        async with self._store.connection() as conn, conn.transaction():
            deleted = await conn.fetchval(
                "DELETE FROM conveyor_schedules WHERE id = $1 "
                "AND ($2::text IS NULL OR owner = $2) RETURNING id",
                schedule_id,
                owner,
            )
            if deleted is None:
                raise ScheduleNotFound(f"no schedule with id {schedule_id}")
            await conn.execute(
                "DELETE FROM conveyor_schedule_fires WHERE schedule_id = $1", schedule_id
            )

    async def due(self, now: float, limit: int = 100) -> list[ScheduleRecord]:
        """Enabled schedules whose next fire (with its jitter) is due at ``now``."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {SCHEDULE_FIELDS} FROM conveyor_schedules WHERE due_at <= $1 "
                "ORDER BY due_at LIMIT $2",
                now,
                limit,
            )
        return [schedule_from_row(row) for row in rows]

    async def next_due(self) -> float | None:
        async with self._store.connection() as conn:
            due = await conn.fetchval("SELECT min(due_at) FROM conveyor_schedules")
        return None if due is None else float(due)

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
        None when another process recorded it first (or moved the schedule on)."""
        store = self._store
        async with store.connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT next_fire_at, last_task_id FROM conveyor_schedules WHERE id = $1 "
                "FOR UPDATE",
                schedule.id,
            )
            if row is None:
                return None
            planned, last_task_id = row
            if outcome != TRIGGERED and planned != schedule.next_fire_at:
                return None  # another process fired it and moved the schedule on
            inserted = await conn.fetchval(
                "INSERT INTO conveyor_schedule_fires (schedule_id, fire_at, outcome, task_id, "
                f"recorded_at) VALUES ($1, $2, $3, NULL, {NOW}) ON CONFLICT DO NOTHING "
                "RETURNING 1",
                schedule.id,
                fire_at,
                outcome,
            )
            if inserted is None:  # recorded already: a change saved over the move put it back
                if outcome != TRIGGERED:
                    await _move_on(conn, schedule, next_fire_at)
                return None
            if missed:
                await conn.execute(
                    "INSERT INTO conveyor_schedule_fires (schedule_id, fire_at, outcome, "
                    f"task_id, recorded_at) SELECT $1, m, 'missed', NULL, {NOW} "
                    "FROM unnest($2::float8[]) m ON CONFLICT DO NOTHING",
                    schedule.id,
                    missed,
                )
            result, created, creating = outcome, None, task
            if creating is not None and schedule.overlap == "skip_if_running" and last_task_id:
                busy = await conn.fetchval(
                    "SELECT 1 FROM conveyor_tasks WHERE id = $1 "
                    "AND status IN ('queued', 'running')",
                    last_task_id,
                )
                if busy:
                    result, creating = SKIPPED_OVERLAP, None
            if creating is not None:
                record, args_json = creating
                if max_queued is not None and await store._queued(conn) >= max_queued:
                    raise QueueFull(f"{max_queued} tasks are already queued", retry_after_s=1)
                await store.insert_rows(conn, [record], [args_json])
                created = record
            await conn.execute(
                "UPDATE conveyor_schedule_fires SET outcome = $1, task_id = $2 "
                "WHERE schedule_id = $3 AND fire_at = $4",
                result,
                created.id if created else None,
                schedule.id,
                fire_at,
            )
            if outcome != TRIGGERED:
                await _move_on(conn, schedule, next_fire_at)
            if created is not None:
                await conn.execute(
                    "UPDATE conveyor_schedules SET last_task_id = $1 WHERE id = $2",
                    created.id,
                    schedule.id,
                )
        if created is not None:
            store.counted(1)
        return result, created

    async def fires(
        self, schedule_id: str, *, limit: int, before: float | None
    ) -> list[FireRecord]:
        """The schedule's fires, latest first."""
        async with self._store.connection() as conn:
            rows = await conn.fetch(
                "SELECT schedule_id, fire_at, outcome, task_id, recorded_at "
                "FROM conveyor_schedule_fires WHERE schedule_id = $1 AND fire_at < $2 "
                "ORDER BY fire_at DESC LIMIT $3",
                schedule_id,
                float("inf") if before is None else before,
                limit,
            )
        return [FireRecord(*row) for row in rows]
