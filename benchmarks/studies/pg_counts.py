"""What the PostgreSQL store's kept counts cost and what they save (``store/postgres_counts.py``).

- The hot path: four connections, each running a task's statements one after another (its
  insert, claim, a progress write and its finish, each its own transaction), with the counting
  triggers and with them dropped, rounds interleaved: tasks per second. Each statement pays the
  trigger's call; the statement that changes no status pays it too and writes nothing.
- The read: the counts by type and status (what ``/metrics``, ``/health`` and the dashboard
  read) and the queued count behind ``429``, from the kept counts and by scanning the table, with
  ``--finished`` finished tasks in it.

- The whole system (``--system N``): Conveyor on Celery (2 pool processes), N tasks a round,
  with and without the triggers, rounds interleaved.

Run: `.venv/bin/python -m benchmarks.studies.pg_counts [--tasks N] [--rounds K] [--finished N]
[--system N]` (starts its own PostgreSQL, as the tests run it: fsync off).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import asyncpg
from tests.support.services import PostgresServer

from conveyor.ids import uuid7
from conveyor.record import TaskRecord
from conveyor.status import TaskStatus
from conveyor.store.postgres import PostgresStore
from conveyor.store.postgres_counts import BY_TYPE, QUEUED

WORKERS = 4
DROP = "".join(
    f"DROP TRIGGER conveyor_count_{k} ON conveyor_tasks;" for k in ("insert", "update", "delete")
)


def task() -> TaskRecord:
    now = time.time()
    return TaskRecord(
        id=uuid7(), name="t.echo", status=TaskStatus.QUEUED, args={}, created_at=now, run_at=now
    )


async def hot_path(url: str, tasks: int) -> float:
    """Each task's statements as the store runs them, one connection per worker: its insert,
    its claim (queued → running), a progress write (no status change) and its finish."""

    async def worker(number: int) -> None:
        conn = await asyncpg.connect(url)
        try:
            for _ in range(tasks // WORKERS):
                task_id = uuid7()
                await conn.execute(
                    "INSERT INTO conveyor_tasks (id, name, status, args, created_at, run_at) "
                    "VALUES ($1, 't.echo', 'queued', '{}', 0, 0)",
                    task_id,
                )
                await conn.execute(
                    "UPDATE conveyor_tasks SET status = 'running', worker_id = $2 WHERE id = $1",
                    task_id,
                    f"w{number}",
                )
                await conn.execute("UPDATE conveyor_tasks SET progress = 50 WHERE id = $1", task_id)
                await conn.execute(
                    "UPDATE conveyor_tasks SET status = 'completed', result = '1' WHERE id = $1",
                    task_id,
                )
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(WORKERS)))
    return tasks / (time.perf_counter() - start)


async def timed(conn: asyncpg.Connection, statement: str, *args: object) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        await conn.fetch(statement, *args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def reads(url: str, finished: int) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO conveyor_tasks (id, name, status, args, created_at, run_at) "
            "SELECT gen_random_uuid()::text, 't.echo', 'completed', '{}', 0, 0 "
            "FROM generate_series(1, $1)",
            finished,
        )
        await conn.execute("ANALYZE conveyor_tasks")
        return {
            "by type and status, kept (ms)": await timed(conn, BY_TYPE, None),
            "by type and status, scanned (ms)": await timed(
                conn, "SELECT name, status, count(*) FROM conveyor_tasks GROUP BY name, status"
            ),
            "queued, kept (ms)": await timed(conn, QUEUED),
            "queued, scanned (ms)": await timed(
                conn, "SELECT count(*) FROM conveyor_tasks WHERE status = 'queued'"
            ),
        }
    finally:
        await conn.close()


async def fresh(server: PostgresServer, *, counted: bool) -> str:
    url = server.create_database()
    store = PostgresStore(url)
    await store.open()
    await store.close()
    if not counted:
        conn = await asyncpg.connect(url)
        await conn.execute(DROP)
        await conn.close()
    return url


class _Uncounted:
    """A PostgreSQL server whose new databases have the counting triggers dropped."""

    def __init__(self, server: PostgresServer) -> None:
        self._server = server

    def create_database(self) -> str:
        return asyncio.run(fresh(self._server, counted=False))


def whole_system(n: int, rounds: int) -> None:
    """Conveyor on Celery (2 pool processes, Redis, PostgreSQL) with and without the counting
    triggers, the rounds interleaved: tasks per second from the first submit to the last done."""
    from benchmarks.celery_engine import bench_servers, conveyor_round

    async def scanned(store: PostgresStore, *, owner: str | None = None) -> dict[str, int]:
        async with store.connection() as conn:
            rows = await conn.fetch("SELECT status, count(*) FROM conveyor_tasks GROUP BY status")
        return {status.value: 0 for status in TaskStatus} | {row[0]: row[1] for row in rows}

    # the round waits for its last task by counting the table: the same scan on both sides
    PostgresStore.count_by_status = scanned  # type: ignore[method-assign]
    rates: dict[bool, list[float]] = {True: [], False: []}
    with bench_servers() as (work, pg, broker, servers):
        for number in range(rounds):
            for counted in (True, False) if number % 2 == 0 else (False, True):
                server: Any = pg if counted else _Uncounted(pg)
                rate, _ = conveyor_round(n, broker.url(), server, 2, work, servers)
                rates[counted].append(rate)
                label = "with" if counted else "without"
                print(f"round {number + 1}: {label} counting triggers: {rate:,.0f} tasks/s")
    with_, without = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"\nConveyor on Celery: {with_:,.0f} vs {without:,.0f} tasks/s: {with_ / without:.2f}x")


async def main(tasks: int, rounds: int, finished: int) -> None:
    server = PostgresServer().start()
    try:
        rates: dict[bool, list[float]] = {True: [], False: []}
        for number in range(rounds):
            for counted in (True, False) if number % 2 == 0 else (False, True):
                rate = await hot_path(await fresh(server, counted=counted), tasks)
                rates[counted].append(rate)
                label = "with" if counted else "without"
                print(f"round {number + 1}: {label} counting triggers: {rate:,.0f} tasks/s")
        with_, without = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"\nhot path: {with_:,.0f} vs {without:,.0f} tasks/s: {with_ / without:.2f}x")
        for label, ms in (await reads(await fresh(server, counted=True), finished)).items():
            print(f"{finished:,} finished tasks: {label}: {ms:.2f}")
    finally:
        server.stop()
        server.remove()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=8_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--system", type=int, default=0, help="tasks per whole-system round")
    options = parser.parse_args()
    if options.system:
        whole_system(options.system, options.rounds)
    else:
        asyncio.run(main(options.tasks, options.rounds, options.finished))
