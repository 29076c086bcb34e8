"""The least a task recorded in PostgreSQL can cost, next to Conveyor, against plain Celery.

Conveyor's guarantees put work on every task's path that a plain Celery no-op does not do: the
task is committed in the store before its message is sent (a 202 means committed), and a worker
records the attempt in the store before running the task (so a task that kills its worker runs a
bounded number of times) and the outcome after it. This benchmark measures that work alone, with
none of Conveyor's code, in plain Celery workers with the settings of `celery_engine.py` (Redis,
prefork, 2 processes, JSON, acks_late, prefetch 1), in the same run as plain Celery and Conveyor:

- plain: the no-op task of `celery_engine.py`;
- one write: the no-op plus one single-row UPDATE by primary key (rows made before the run);
- least bookkeeping: the client inserts each group of 200 rows (committed) before sending their
  messages; each task runs one statement that marks its row running (the claim) and the
  previous task's row completed (its outcome, carried by the next claim as Conveyor does), on a
  table with its primary key as its only index: no lease, no due date, no queue order, no
  listing or recovery index, no notification;
- conveyor: `demo.echo` through Conveyor's Celery engine, as in `celery_engine.py`.

Each worker's pool process talks to PostgreSQL through asyncpg on an event loop thread of its
own, as Conveyor's do. Each round runs all four (the order reverses every other round); prints
medians, each round's own ratio to plain Celery, how long a pool process held each message, and
the CPU time per task of each part.

Run: `.venv/bin/python -m benchmarks.studies.celery_floor [-n 10000] [--rounds 5]` (starts its own
PostgreSQL and Redis).
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import asyncpg
from tests.support.services import PostgresServer

from ..celery_engine import (
    HELD,
    PLAIN_APP,
    PROCESSES,
    Result,
    bench_servers,
    conveyor_round,
    plain_round,
    rounds_and_size,
)

# The plain app's tasks that write to PostgreSQL: each pool process connects once, from the
# event loop thread it starts.
FLOOR_TASKS = """
import asyncio, threading
import asyncpg, uvloop
from celery import signals

LINK = {}

@signals.worker_process_init.connect
def connect(**_):
    LINK["loop"] = loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    LINK["conn"] = run(asyncpg.connect(os.environ["FLOOR_DSN"]))

def run(coroutine):
    return asyncio.run_coroutine_threadsafe(coroutine, LINK["loop"]).result()

@app.task(name="one_write")
def one_write(i):
    run(LINK["conn"].execute("UPDATE floor SET attempts = attempts + 1 WHERE id = $1", i))

@app.task(name="least")
def least(i):
    run(LINK["conn"].fetchrow(
        "WITH done AS (UPDATE floor SET status = 'completed', result = 'null' "
        "WHERE id = $2 AND status = 'running'), "
        "claimed AS (UPDATE floor SET status = 'running', attempts = attempts + 1 "
        "WHERE id = $1 AND status = 'queued' RETURNING args) SELECT args FROM claimed",
        i, LINK.get("previous", -1)))
    LINK["previous"] = i
"""
TABLE = (
    "CREATE TABLE floor (id INTEGER PRIMARY KEY, status TEXT NOT NULL, "
    "attempts INTEGER NOT NULL, args TEXT NOT NULL, result TEXT)"
)
SIDES = {
    "plain": "plain Celery",
    "one_write": "+ one write",
    "least": "+ least bookkeeping",
    "conveyor": "Conveyor on Celery",
}


class FloorDatabase:
    """A fresh database with the ``floor`` table, and a client connection to fill it."""

    def __init__(self, pg: PostgresServer, *, rows: int = 0) -> None:
        self.url = pg.create_database()
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(self.url))
        self.execute(TABLE)
        if rows:
            self.execute(
                "INSERT INTO floor SELECT n, 'queued', 0, '[]' FROM generate_series(0, $1) n", rows
            )
            self.execute("VACUUM ANALYZE floor")

    def execute(self, statement: str, *args: object) -> None:
        self.loop.run_until_complete(self.conn.execute(statement, *args))

    def insert(self, numbers: range) -> None:
        """The rows of tasks about to be sent, committed (the least a 202 can mean)."""
        self.execute(
            "INSERT INTO floor SELECT n, 'queued', 0, '[]' FROM unnest($1::int[]) n", list(numbers)
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def floor_round(
    side: str, n: int, broker: str, pg: PostgresServer, work: Path, servers: tuple[int, int]
) -> Result:
    if side == "plain":  # the very run of celery_engine.py
        return plain_round(n, broker, 2, work, servers)
    if side == "conveyor":
        return conveyor_round(n, broker, pg, 2, work, servers)
    database = FloorDatabase(pg, rows=n if side == "one_write" else 0)
    try:
        return plain_round(
            n,
            broker,
            2,
            work,
            servers,
            task=side,
            app=PLAIN_APP + FLOOR_TASKS,
            env={"FLOOR_DSN": database.url},
            before_send=database.insert if side == "least" else None,
        )
    finally:
        database.close()


def main() -> None:
    options = rounds_and_size()
    runs: dict[str, list[Result]] = {side: [] for side in SIDES}
    with bench_servers() as (work, pg, broker, servers):
        for index in range(options.rounds):
            order = list(SIDES) if index % 2 == 0 else list(reversed(SIDES))
            for side in order:
                runs[side].append(floor_round(side, options.n, broker.url(), pg, work, servers))
            print(
                "round: " + ", ".join(f"{SIDES[s]} {runs[s][-1][0]:.0f}/s" for s in SIDES),
                flush=True,
            )
        report(options.n, options.rounds, runs)


def report(n: int, rounds: int, runs: dict[str, list[Result]]) -> None:
    plain = [rate for rate, _ in runs["plain"]]
    columns = (*PROCESSES, "idle", HELD)
    print(f"\n{n} tasks, Redis broker, prefork, 2 processes, medians of {rounds}")
    print(
        f"  {'':22}{'tasks/s':>9}{'ratio':>8}{'in rounds':>18}"
        + "".join(f"{c:>12}" for c in columns)
    )
    for side, label in SIDES.items():
        rates = [rate for rate, _ in runs[side]]
        ratio = statistics.median(rates) / statistics.median(plain)
        paired = [r / p for r, p in zip(rates, plain, strict=True)]
        within = f"{statistics.median(paired):.3f} ({min(paired):.2f}-{max(paired):.2f})"
        cells = "".join(
            f"{statistics.median(used[c] for _, used in runs[side]):12.2f}" for c in columns
        )
        print(f"  {label:22}{statistics.median(rates):9.0f}{ratio:8.3f}{within:>18}{cells}")
    print("  (CPU time per task in ms for each part; idle: both cores; held: ms per message)")


if __name__ == "__main__":
    main()
