"""Retention under load: `POST /tasks` latency while the workers purge a million expired tasks,
against the same load with retention off, in one run.

A SQLite store is filled with `--finished` completed tasks that finished two days ago (rows
written straight into the file, with their counts). For each way, a copy of that file is served
by `conveyor serve` (workers in the process): with `CONVEYOR_RESULT_TTL=1d` its retention starts
purging them at once; with `none` it keeps them. Meanwhile `--clients` concurrent clients send
`POST /tasks` (`demo.echo`) for `--seconds`; the table shows requests/s, p50 and p99 latency,
and how many expired tasks were left when the load ended. Target: p99 with the purge at most
twice the p99 without it.

Run with `.venv/bin/python -m benchmarks.retention [--finished N] [--clients N] [--seconds S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from conveyor import Conveyor, Settings

from .support import free_port, serve


def fill(data_dir: Path, n: int) -> None:
    """A store whose tasks are ``n`` completed ``demo.echo`` runs, finished two days ago."""

    async def create() -> None:  # the schema, as a first start makes it
        async with Conveyor(Settings(data_dir=data_dir), run_workers=False):
            pass

    asyncio.run(create())
    old = time.time() - 2 * 86400
    with sqlite3.connect(data_dir / "conveyor.db") as db:
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO tasks (id, name, owner, status, args, result, attempts, max_attempts, "
            "created_at, started_at, finished_at, run_at) SELECT "
            "printf('%08x-0000-7000-8000-%012x', i, i), 'demo.echo', '', 'completed', "
            "'{\"value\":1}', '1', 1, 1, ?, ?, ?, ? FROM n",
            (n, old, old, old, old),
        )
        db.execute(
            "INSERT INTO task_counts (owner, name, status, n) VALUES ('', 'demo.echo', "
            "'completed', ?) ON CONFLICT DO UPDATE SET n = n + excluded.n",
            (n,),
        )


async def load(url: str, clients: int, seconds: float) -> list[float]:
    """Latencies (ms) of ``POST /tasks`` sent back to back by ``clients`` clients."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    body = {"name": "demo.echo", "args": {"value": 1}}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await http.post("/tasks", json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 202, response.text

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def one_way(template: Path, ttl: str, clients: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(template / "conveyor.db", Path(tmp) / "conveyor.db")
        port = free_port()
        env = {
            **os.environ,
            "CONVEYOR_DATA_DIR": tmp,
            "CONVEYOR_RESULT_TTL": ttl,
            "CONVEYOR_MAX_QUEUED": "10000000",
            "CONVEYOR_LOG_LEVEL": "warning",
        }
        args = [sys.executable, "-m", "conveyor", "serve", "--port", str(port)]
        process = serve(args, port, env)
        try:
            latencies = asyncio.run(load(f"http://127.0.0.1:{port}", clients, seconds))
        finally:
            process.terminate()
            process.wait(60)
        with sqlite3.connect(Path(tmp) / "conveyor.db") as db:
            (left,) = db.execute(
                "SELECT count(*) FROM tasks WHERE status = 'completed' AND finished_at < ?",
                (time.time() - 86400,),
            ).fetchone()
    return {
        "per_s": len(latencies) / seconds,
        "p50": statistics.median(latencies),
        "p99": statistics.quantiles(latencies, n=100)[98],
        "left": left,
    }


def main(finished: int, clients: int, seconds: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as template:
        fill(Path(template), finished)
        ways = {"retention off (none)": "none", "purging (1d)": "1d"}
        found: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
        for _ in range(rounds):  # interleaved: the machine's drift hits both alike
            for way, ttl in ways.items():
                found[way].append(one_way(Path(template), ttl, clients, seconds))
    print(f"\n{finished:,} expired tasks, {clients} clients for {seconds:g} s, {rounds} rounds\n")
    print("| way | POST /tasks per s | p50 (ms) | p99 (ms) | expired left at the end |")
    print("| --- | --- | --- | --- | --- |")
    p99 = {}
    for way, rows in found.items():
        p99[way] = statistics.median(r["p99"] for r in rows)
        print(
            f"| {way} | {statistics.median(r['per_s'] for r in rows):,.0f} | "
            f"{statistics.median(r['p50'] for r in rows):.1f} | {p99[way]:.1f} | "
            f"{statistics.median(r['left'] for r in rows):,.0f} |"
        )
    off, on = p99["retention off (none)"], p99["purging (1d)"]
    print(f"\np99 purging / p99 off: {on / off:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    main(args.finished, args.clients, args.seconds, args.rounds)
