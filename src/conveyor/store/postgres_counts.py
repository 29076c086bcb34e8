"""The PostgreSQL store's task counts by owner, type and status, kept by the database itself, so
that reading them (the queued count behind ``429``, ``/health``, ``/metrics``, the dashboard)
costs the same with a hundred tasks or ten million.

Triggers (``conveyor_count_*``) add what each statement changed in the statement's own
transaction: an insert adds its rows and a delete takes its rows away, grouped, in one
statement-level call with the statement's transition table (a batch of 100,000 is one call); an
update calls a row-level function only for a row whose status changed (the trigger's ``WHEN``
is checked without a call: heartbeats, progress and messages pay nothing), which takes the old
status away and adds the new one. Each database connection adds to
rows of its own (``shard`` = its backend's pid), so two transactions never wait on, or
deadlock over, one counter row; a read sums the shards. The rows of connections that have
closed are folded into shard 0 now and then (``FOLD``, by one process at a time), so the table
stays as small as the number of live connections times types and statuses.
"""

from __future__ import annotations

_ADD = """
    INSERT INTO conveyor_task_counts AS c (owner, name, status, shard, n)
    SELECT owner, name, status, pg_backend_pid(), {sign} count(*) FROM {rows}
    GROUP BY owner, name, status
    ON CONFLICT (owner, name, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
"""
# an insert or a delete: one statement-level call, whatever its number of rows
_ROWS = {
    "insert": ("INSERT", "NEW TABLE AS new_rows", _ADD.format(sign="", rows="new_rows")),
    "delete": ("DELETE", "OLD TABLE AS old_rows", _ADD.format(sign="-", rows="old_rows")),
}


def _statement_trigger(kind: str) -> str:
    event, referencing, body = _ROWS[kind]
    return f"""
CREATE OR REPLACE FUNCTION conveyor_count_{kind}() RETURNS trigger AS $$
BEGIN
{body}
    RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS conveyor_count_{kind} ON conveyor_tasks;
CREATE TRIGGER conveyor_count_{kind} AFTER {event} ON conveyor_tasks
    REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION conveyor_count_{kind}();
"""


# an update: called only for a row whose status changed (the WHEN is checked without a call),
# so heartbeats, progress and messages cost nothing here
_UPDATE = """
CREATE OR REPLACE FUNCTION conveyor_count_update() RETURNS trigger AS $$
BEGIN
    INSERT INTO conveyor_task_counts AS c (owner, name, status, shard, n)
    VALUES (OLD.owner, OLD.name, OLD.status, pg_backend_pid(), -1),
           (NEW.owner, NEW.name, NEW.status, pg_backend_pid(), 1)
    ON CONFLICT (owner, name, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS conveyor_count_update ON conveyor_tasks;
CREATE TRIGGER conveyor_count_update AFTER UPDATE OF status ON conveyor_tasks
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION conveyor_count_update();
"""


# Creating the triggers locks the table against writes until the transaction commits, so the
# first count below and the triggers' additions neither miss nor repeat a task.
COUNTS = (
    """
CREATE TABLE IF NOT EXISTS conveyor_task_counts (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    shard INTEGER NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (owner, name, status, shard)
);
"""
    + "".join(_statement_trigger(kind) for kind in _ROWS)
    + _UPDATE
    + """
DELETE FROM conveyor_task_counts;
INSERT INTO conveyor_task_counts (owner, name, status, shard, n)
    SELECT owner, name, status, 0, count(*) FROM conveyor_tasks GROUP BY owner, name, status;
"""
)

# the rows of closed connections, added to shard 0 (under an advisory lock: one folder at once)
FOLD = """
WITH gone AS (
    DELETE FROM conveyor_task_counts c WHERE shard <> 0
        AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = c.shard)
    RETURNING owner, name, status, n
)
INSERT INTO conveyor_task_counts AS c (owner, name, status, shard, n)
SELECT owner, name, status, 0, sum(n) FROM gone GROUP BY owner, name, status
ON CONFLICT (owner, name, status, shard) DO UPDATE SET n = c.n + EXCLUDED.n
"""
LOCK_FOLD = 7_436_022

BY_TYPE = (
    "SELECT name, status, sum(n)::bigint FROM conveyor_task_counts "
    "WHERE $1::text IS NULL OR owner = $1 GROUP BY name, status HAVING sum(n) <> 0"
)
BY_STATUS = (
    "SELECT status, sum(n)::bigint FROM conveyor_task_counts "
    "WHERE $1::text IS NULL OR owner = $1 GROUP BY status"
)
QUEUED = "SELECT coalesce(sum(n), 0)::bigint FROM conveyor_task_counts WHERE status = 'queued'"
