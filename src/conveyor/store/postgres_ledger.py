"""The Celery engine's publication ledger, in PostgreSQL beside the tasks.

``published_at`` says when a task's broker message was last sent. The sweeper
(:meth:`PostgresLedger.due_for_publish`) re-sends messages for queued tasks that are due and were
never published since they became due, or whose message looks lost; a worker claims the task a
message names with :meth:`PostgresLedger.claim_one`, which also carries the outcome of its
process's previous task (see ``PostgresStore.finish``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import asyncpg

from ..errors import StoreUnavailable
from ..rates import Rate
from ..record import TaskRecord
from .postgres_sql import NO_OUTCOME, NOW, UNPUBLISHED, outcome, record_starts, remaining
from .rows import COLUMNS, record_from_row

logger = logging.getLogger("conveyor.store")

HeldOutcome = tuple[tuple[Any, ...], "asyncio.Future[bool]"]

# One statement. ``named``: whether the named task is claimable, or was taken by a
# message that named another task (``stolen``: this message then stands in for that
# one). ``target``: the best queued task of the type. ``claimed``: it, now running; if it
# still has a message in flight, that message becomes a stand-in (``stolen``).
CLAIM_ONE = (
    f"WITH named AS (SELECT status = 'queued' AND run_at <= {NOW} AS due, "
    "status <> 'queued' AND stolen AS stand_in FROM conveyor_tasks WHERE id = $1), "
    "target AS (SELECT id, published_at FROM conveyor_tasks WHERE status = 'queued' "
    f"AND name = $2 AND run_at <= {NOW} "
    "AND ((SELECT due FROM named) OR (SELECT stand_in FROM named)) "
    "ORDER BY priority DESC, run_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED), "
    "claimed AS (UPDATE conveyor_tasks t SET status = 'running', "
    f"attempts = attempts + 1, worker_id = $3, lease_expires_at = {NOW} + $4, "
    f"started_at = {NOW}, progress = 0, message = NULL, "
    "stolen = (t.id <> $1 AND target.published_at IS NOT NULL) FROM target "
    f"WHERE t.id = target.id RETURNING {', '.join('t.' + c for c in COLUMNS.split(', '))}, "
    "target.published_at IS NULL AS no_message), "
    "used AS (UPDATE conveyor_tasks SET stolen = FALSE WHERE id = $1 "
    "AND (SELECT stand_in FROM named) AND EXISTS (SELECT 1 FROM claimed)), "
    # an outcome of this process that was waiting (``OUTCOME_HOLD_S``), or none ($9 NULL)
    f"done AS (UPDATE conveyor_tasks {outcome(5)} RETURNING id) "
    "SELECT claimed.*, (SELECT due FROM named) AS due, (SELECT id FROM done) AS done "
    "FROM (SELECT 1) one LEFT JOIN claimed ON TRUE"
)


class LedgerBackend(Protocol):
    """What the ledger uses of the PostgreSQL store it lives beside."""

    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

    def hot(self, lane: str) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> None: ...

    def take_held(self, task_id: str) -> HeldOutcome | None: ...

    async def write_held(self) -> None: ...

    async def write_outcome(
        self, outcome: tuple[Any, ...], future: asyncio.Future[bool]
    ) -> None: ...

    def claimed(self, n: int) -> None: ...


class PostgresLedger:
    """Which queued tasks have a broker message, and claims for the task a message names."""

    def __init__(self, store: LedgerBackend) -> None:
        self._store = store

    async def claim_one(
        self,
        task_id: str,
        *,
        name: str,
        worker_id: str,
        limit: int | None,
        lease_s: float,
        rate: Rate | None = None,
    ) -> TaskRecord | None:
        """Claim for the task a message names; None when the message is to be dropped.

        A message stands for its type: the best queued task of that type is claimed (priority,
        then due date, then submission order), so the store's order holds whatever order
        concurrent consumers receive messages in. Usually that is the named task. When it is
        another one, whose own message is still in flight, that task is marked ``stolen`` and
        its message, when it comes, claims in turn for the type instead of being dropped: one
        message, one claim, and no task left without a message.

        Otherwise the message is dropped: its task is finished, cancelled, running elsewhere, or
        not yet due (a retry waiting for its backoff). A type with a concurrency ``limit`` is
        claimed under the type's lock, within the limit, across every worker; so is a type with
        a ``rate``, whose start is recorded in the same transaction. When the named
        task stays queued with no message (no room for its type), its ``published_at`` is
        cleared and the sweeper sends it again.
        """
        locked = limit is not None or rate is not None
        if not locked:
            held = self._store.take_held(task_id)
        else:  # the type's room counts running tasks: what ended is written first
            held = None
            await self._store.write_held()
        args = (task_id, name, worker_id, lease_s, *(held[0] if held else NO_OUTCOME))
        try:
            async with self._store.hot("claim") as conn:
                if not locked:  # one round trip
                    found = await conn.fetchrow(CLAIM_ONE, *args)
                else:
                    async with conn.transaction():
                        limits = {} if limit is None else {name: limit}
                        rates = {} if rate is None else {name: rate}
                        room = (await remaining(conn, limits, rates))[name] > 0
                        found = await conn.fetchrow(CLAIM_ONE, *args) if room else None
                        if found is not None and found[1] is not None:
                            await record_starts(conn, [(name, found[15])], rates)
        except BaseException:
            if held is not None:  # whether it was written is unknown: write it on its own
                self._store.spawn(self._store.write_outcome(*held))
            raise
        if held is not None and not held[1].done():
            held[1].set_result(found is not None and found["done"] is not None)
        row = None if found is None or found[1] is None else found
        # The named task stays queued without a message: when nothing was claimed, or when the
        # task taken instead had no message of its own left to stand in for it.
        if (found is None or found["due"]) and (
            row is None or (row[1] != task_id and row["no_message"])
        ):
            # after the commit (no lock of ours is held), and without delaying the claimed task
            self._store.spawn(self._unpublish_quietly(task_id))
        if row is None:
            return None
        self._store.claimed(1)
        return record_from_row(row)

    async def due_for_publish(
        self,
        *,
        stale_s: float | None,
        limits: Mapping[str, int],
        n: int = 1000,
        rates: Mapping[str, Rate] | None = None,
    ) -> list[tuple[str, str, int]]:
        """``(id, name, priority)`` of queued, due tasks whose broker message must be sent:
        never sent since they became due, or (when ``stale_s`` is given) sent more than
        ``stale_s`` ago; types at their concurrency limit wait. Marks them sent."""
        unsent = UNPUBLISHED
        if stale_s is not None:  # this one reads every queued task: the caller runs it rarely
            stale = f"status = 'queued' AND published_at < {NOW} - {float(stale_s)!r}"
            unsent = f"({UNPUBLISHED}) OR ({stale})"
        async with self._store.connection() as conn, conn.transaction():
            room = await remaining(conn, limits, rates)
            saturated = [name for name, left in room.items() if left <= 0]
            rows = await conn.fetch(
                f"UPDATE conveyor_tasks t SET published_at = {NOW} FROM ("
                f"SELECT id FROM conveyor_tasks WHERE ({unsent}) AND run_at <= {NOW} "
                "AND NOT (name = ANY($1::text[])) "
                "ORDER BY priority DESC, run_at, seq LIMIT $2 FOR UPDATE SKIP LOCKED) due "
                "WHERE t.id = due.id RETURNING t.id, t.name, t.priority",
                saturated,
                n,
            )
        return [(row[0], row[1], row[2]) for row in rows]

    async def _unpublish_quietly(self, task_id: str) -> None:
        try:
            await self.mark_unpublished(task_id)
        except StoreUnavailable as exc:  # the stale-message sweep sends it later
            logger.warning("task %s waits for the stale-message sweep: %s", task_id, exc)

    async def mark_unpublished(self, task_id: str) -> None:
        """Its message could not be sent: the next sweep sends it."""
        async with self._store.connection() as conn:
            await conn.execute(
                "UPDATE conveyor_tasks SET published_at = NULL WHERE id = $1 AND status = 'queued'",
                task_id,
            )
