"""How a claim's cost grows with the tasks claimed since the last vacuum (PostgreSQL store).

N tasks are queued, then claimed and completed one at a time, as a Celery pool process does it
(each outcome travels with the next claim). Each claim finds the best queued task of its type
through the queue index, stepping over the entries of the tasks claimed before it until a
vacuum removes them. Prints PostgreSQL's CPU time per claim for each block of claims, without a
vacuum, then with ``VACUUM ANALYZE conveyor_tasks`` every ``--vacuum-every`` claims (the
vacuums' own CPU included).

Run: `.venv/bin/python -m benchmarks.studies.claim_growth [-n 100000] [--block 10000]`
(starts its own PostgreSQL, configured as in the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg
from tests.support.services import PostgresServer

from conveyor.ids import uuid7
from conveyor.record import TaskRecord
from conveyor.status import TaskStatus
from conveyor.store.postgres import PostgresStore

from ..support import postmaster_pid, processes

WORKER = "bench:1"


def postgres_cpu_s(postmaster: int) -> float:
    """CPU seconds of the server's processes (its backends and its own)."""
    return sum(usage.cpu_s for usage in processes().values() if usage.parent == postmaster)


async def no_autovacuum(url: str) -> None:
    """Only the runs' own vacuums: the throwaway server's autovacuum is turned off."""
    conn = await asyncpg.connect(url)
    await conn.execute("ALTER SYSTEM SET autovacuum = off")
    await conn.fetchval("SELECT pg_reload_conf()")
    await conn.close()


async def run(url: str, postmaster: int, n: int, block: int, vacuum_every: int | None) -> None:
    store = PostgresStore(url)
    await store.open()
    now = time.time()
    records = [
        TaskRecord(
            id=uuid7(),
            name="demo.echo",
            status=TaskStatus.QUEUED,
            args={"value": 1},
            created_at=now,
            run_at=now,
        )
        for _ in range(n)
    ]
    for start in range(0, n, 500):  # grouped into multi-row inserts, as submissions are
        chunk = records[start : start + 500]
        await asyncio.gather(
            *(store.insert(r, args_json='{"value": 1}', max_queued=None) for r in chunk)
        )
    ids = [record.id for record in records]
    vacuum = await asyncpg.connect(url)
    # The first vacuum visits every freshly loaded page: it runs before the clock starts. Each
    # vacuum also analyzes, as autovacuum does after a bulk of changes.
    await vacuum.execute("VACUUM ANALYZE conveyor_tasks")
    costs: list[str] = []
    outcomes: list[asyncio.Future[bool]] = []
    for start in range(0, n, block):
        before = postgres_cpu_s(postmaster)
        for index, task_id in enumerate(ids[start : start + block], start):
            if vacuum_every and index and index % vacuum_every == 0:
                await vacuum.execute("VACUUM ANALYZE conveyor_tasks")
            record = await store.publication_ledger().claim_one(
                task_id, name="demo.echo", worker_id=WORKER, limit=None, lease_s=30.0
            )
            assert record is not None
            outcome = store.finish(
                record.id, WORKER, record.attempts, status=TaskStatus.COMPLETED, result_json="1"
            )
            outcomes.append(asyncio.ensure_future(outcome))  # written with the next claim
            await asyncio.sleep(0)
        costs.append(f"{1e6 * (postgres_cpu_s(postmaster) - before) / block:5.0f}")
    await asyncio.gather(*outcomes)
    label = f"VACUUM every {vacuum_every:,}" if vacuum_every else "no vacuum"
    print(f"  {label:20} {' '.join(costs)}", flush=True)
    await vacuum.close()
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--block", type=int, default=10_000)
    parser.add_argument("--vacuum-every", type=int, default=5_000)
    options = parser.parse_args()
    pg = PostgresServer().start()
    try:
        print(
            f"PostgreSQL CPU per claim (µs), for each block of {options.block:,} claims "
            f"({options.n:,} tasks):"
        )
        asyncio.run(no_autovacuum(pg.url()))
        for vacuum_every in (None, options.vacuum_every):
            url = pg.create_database()
            asyncio.run(run(url, postmaster_pid(pg.data), options.n, options.block, vacuum_every))
    finally:
        pg.stop()
        pg.remove()


if __name__ == "__main__":
    main()
