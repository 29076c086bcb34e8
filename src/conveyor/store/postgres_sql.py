"""PostgreSQL statement fragments shared by the store and its publication ledger."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Protocol

import asyncpg

from ..errors import InvalidArguments, StoreUnavailable
from ..rates import Rate
from ..record import TaskRecord

NOW = "extract(epoch from clock_timestamp())::float8"
# Queued tasks whose message is still to be sent (new, delayed, retried): what the sweeper reads
# several times a second, without scanning the tasks whose message is already on its way.


class TaskInserter(Protocol):
    """What the store's companions (batches, schedules) use of the PostgreSQL store: its
    connections and its insert of new tasks, checked against and counted in the queue bound."""

    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

    async def _queued(self, conn: asyncpg.Connection) -> int: ...

    def counted(self, n: int) -> None: ...

    async def insert_rows(
        self, conn: asyncpg.Connection, records: Sequence[TaskRecord], args_json: Sequence[str]
    ) -> None: ...


UNPUBLISHED = "status = 'queued' AND (published_at IS NULL OR published_at < run_at)"
CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    TimeoutError,
)


# A task still held by the worker that claimed it (this attempt), its id, worker and attempt in
# the given parameters. IS NOT DISTINCT FROM leaves the id as the only condition an index can
# serve: with ``=``, a generic plan made before the table's first ANALYZE scans the worker's
# running tasks (conveyor_tasks_running) instead (measured: 0.59 ms with 4,000, against 0.02).
def held(task: int, worker: int, attempt: int) -> str:
    return (
        f"id = ${task} AND (status, worker_id, attempts) "
        f"IS NOT DISTINCT FROM ('running', ${worker}, ${attempt})"
    )


def outcome(first: int) -> str:
    """An attempt's outcome, from 7 parameters numbered from ``first``: status, result,
    result_blob, error, then the held task (id, worker, attempt)."""
    status, result, blob, error = (f"${n}" for n in range(first, first + 4))
    return (
        f"SET status = {status}, result = {result}, result_blob = {blob}, error = {error}, "
        f"finished_at = {NOW}, lease_expires_at = NULL, "
        f"progress = CASE WHEN {status} = 'completed' THEN 100 ELSE progress END "
        f"WHERE {held(first + 4, first + 5, first + 6)}"
    )


FINISH = f"UPDATE conveyor_tasks {outcome(1)}"
NO_OUTCOME = (None,) * 7
OUTCOME_TASK = 4  # where an outcome's parameters (see _outcome) hold the task id
# An outcome waits this long for the next claim of its process, to travel in the same statement
# (measured per task: 290-300 → 190-200 µs of PostgreSQL CPU, 100-110 → 50-55 µs of the
# worker's); then it is written on its own.
OUTCOME_HOLD_S = 0.005


# Starts of a rate-limited type within its period (parameters: the type, the period).
RATE_USED = f"SELECT count(*) FROM conveyor_rate_starts WHERE name = $1 AND at > {NOW} - $2"


async def remaining(
    conn: asyncpg.Connection, limits: Mapping[str, int], rates: Mapping[str, Rate] | None = None
) -> dict[str, int]:
    """Room left under each per-type limit and rate (the smaller of the two); locks those
    types until the transaction ends."""
    rates = rates or {}
    if not limits and not rates:
        return {}
    names = sorted(set(limits) | set(rates))
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('conveyor:' || n)) FROM unnest($1::text[]) n",
        names,
    )
    room: dict[str, int] = {}
    if limits:
        running = {
            row[0]: row[1]
            for row in await conn.fetch(
                "SELECT name, count(*) FROM conveyor_tasks WHERE status = 'running' "
                "AND name = ANY($1::text[]) GROUP BY name",
                sorted(limits),
            )
        }
        room = {name: limit - running.get(name, 0) for name, limit in limits.items()}
    for name, rate in rates.items():
        used = await conn.fetchval(RATE_USED, name, rate.period_s)
        left = rate.count - used
        room[name] = min(room.get(name, left), left)
    return room


async def record_starts(
    conn: asyncpg.Connection, starts: Sequence[tuple[str, float]], rates: Mapping[str, Rate]
) -> None:
    """Record the starts ``(type, started_at)`` of rate-limited types, and forget the starts
    older than their period."""
    limited = [(name, at) for name, at in starts if name in rates]
    if not limited:
        return
    await conn.executemany("INSERT INTO conveyor_rate_starts (name, at) VALUES ($1, $2)", limited)
    for name in {name for name, _ in limited}:
        await conn.execute(
            f"DELETE FROM conveyor_rate_starts WHERE name = $1 AND at <= {NOW} - $2",
            name,
            rates[name].period_s,
        )


@contextmanager
def unavailable_on_failure() -> Iterator[None]:
    """PostgreSQL unreachable or failing: ``StoreUnavailable`` (the API answers 503). A value
    PostgreSQL's text cannot hold (a NUL character, in a lookup by a client's id or name) is the
    client's: ``InvalidArguments`` (422)."""
    try:
        yield
    except (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError) as exc:
        raise InvalidArguments(
            "a value holds a character PostgreSQL's text cannot hold (such as NUL, U+0000)"
        ) from exc
    except CONNECTION_ERRORS as exc:
        raise StoreUnavailable(f"PostgreSQL is unreachable: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise StoreUnavailable(f"PostgreSQL failed: {exc}") from exc


async def insert_rows(
    conn: asyncpg.Connection, records: Sequence[TaskRecord], args_json: Sequence[str]
) -> None:
    """One statement for many new tasks, their times on the database's clock (the delay is what
    the submitting host added); each record gets its ``seq`` and stored times."""
    rows = await conn.fetch(
        "INSERT INTO conveyor_tasks (id, name, owner, status, priority, args, "
        "max_attempts, timeout_s, created_at, run_at, published_at, batch_id, "
        "idempotency_key) "
        "SELECT i, n, o, s, p, a, m, t, k.now, k.now + d, CASE WHEN d <= 0 THEN k.now "
        "END, b, y FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], "
        "$6::text[], $7::int[], $8::float8[], $9::float8[], $10::text[], $11::text[]) "
        f"AS u(i, n, o, s, p, a, m, t, d, b, y) CROSS JOIN (SELECT {NOW} AS now) k "
        "RETURNING id, seq, created_at, run_at",
        [r.id for r in records],
        [r.name for r in records],
        [r.owner for r in records],
        [r.status.value for r in records],
        [r.priority for r in records],
        list(args_json),
        [r.max_attempts for r in records],
        [r.timeout_s for r in records],
        [max(r.run_at - r.created_at, 0.0) for r in records],
        [r.batch_id for r in records],
        [r.idempotency_key for r in records],
    )
    stored = {row[0]: (row[1], row[2], row[3]) for row in rows}
    for record in records:
        record.seq, record.created_at, record.run_at = stored[record.id]
