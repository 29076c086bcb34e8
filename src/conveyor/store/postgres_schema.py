"""The PostgreSQL store's schema: the tasks table, its indexes, the change trigger, migrations."""

from __future__ import annotations

import asyncpg

from ..errors import StoreUnavailable
from .logs import POSTGRES_LOGS
from .postgres_batches import BATCHES
from .postgres_counts import COUNTS
from .postgres_schedules import SCHEDULES
from .postgres_sql import UNPUBLISHED
from .stats import POSTGRES_TOTALS
from .workers import POSTGRES_WORKERS

SCHEMA_VERSION = 9
CHANNEL = "conveyor_tasks"  # a task's state, progress or message changed: id
_LOCK_MIGRATE = 7_436_021  # advisory lock held while the schema is created or migrated
_UNPUBLISHED_INDEX = (
    f"CREATE INDEX IF NOT EXISTS conveyor_tasks_unpublished ON conveyor_tasks (run_at) "
    f"WHERE {UNPUBLISHED};"
)

# PostgreSQL (before 19) wakes every backend that LISTENs in the database for every NOTIFY,
# whatever its channel: measured, each listening connection costs the server about 40 µs of CPU
# per task state change. Only processes with a client waiting listen; workers learn of cancel
# requests through their heartbeat (at most a second), as they do with the SQLite store.
_NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION conveyor_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS conveyor_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conveyor_tasks (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    args TEXT NOT NULL,
    result TEXT,
    error TEXT,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 1,
    timeout_s DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    run_at DOUBLE PRECISION NOT NULL,
    idempotency_key TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    worker_id TEXT,
    lease_expires_at DOUBLE PRECISION,
    result_blob TEXT,
    published_at DOUBLE PRECISION,
    stolen BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS conveyor_tasks_ready ON conveyor_tasks (priority DESC, run_at, seq)
    WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS conveyor_tasks_ready_by_name
    ON conveyor_tasks (name, priority DESC, run_at, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS conveyor_tasks_running
    ON conveyor_tasks (worker_id, lease_expires_at) WHERE status = 'running';
{_UNPUBLISHED_INDEX}
CREATE INDEX IF NOT EXISTS conveyor_tasks_running_name ON conveyor_tasks (name)
    WHERE status = 'running';
CREATE UNIQUE INDEX IF NOT EXISTS conveyor_tasks_idempotency
    ON conveyor_tasks (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS conveyor_tasks_owner_seq ON conveyor_tasks (owner, seq);
CREATE INDEX IF NOT EXISTS conveyor_tasks_status_seq ON conveyor_tasks (status, seq);
{_NOTIFY_FUNCTION}
DROP TRIGGER IF EXISTS conveyor_tasks_changed ON conveyor_tasks;
CREATE TRIGGER conveyor_tasks_changed
    AFTER DELETE OR UPDATE OF status, progress, message, cancel_requested
    ON conveyor_tasks FOR EACH ROW EXECUTE FUNCTION conveyor_notify();
"""
# Each step takes a store from the version before it to its own; a new store gets _SCHEMA.
_MIGRATIONS: dict[int, str] = {
    2: _UNPUBLISHED_INDEX,
    3: _NOTIFY_FUNCTION,
    4: BATCHES,
    5: POSTGRES_WORKERS,
    6: POSTGRES_LOGS,
    7: SCHEDULES,
    8: POSTGRES_TOTALS,
    9: COUNTS,
}


async def migrate(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_MIGRATE)
        exists = await conn.fetchval("SELECT to_regclass('conveyor_tasks') IS NOT NULL")
        if not exists:
            await conn.execute(_SCHEMA)
            await conn.execute(BATCHES)
            await conn.execute(POSTGRES_WORKERS)
            await conn.execute(POSTGRES_LOGS)
            await conn.execute(SCHEDULES)
            await conn.execute(POSTGRES_TOTALS)
            await conn.execute(COUNTS)
            await conn.execute("INSERT INTO conveyor_schema (version) VALUES ($1)", SCHEMA_VERSION)
            return
        version = await conn.fetchval("SELECT max(version) FROM conveyor_schema") or 1
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the PostgreSQL store is at schema {version}, newer than this Conveyor "
                f"({SCHEMA_VERSION}); upgrade Conveyor"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute(_MIGRATIONS[target])
        if version < SCHEMA_VERSION:
            await conn.execute("UPDATE conveyor_schema SET version = $1", SCHEMA_VERSION)
