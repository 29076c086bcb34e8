"""Schedules: fire lateness with three processes sharing one SQLite file, and the idle cost.

- lateness: `--schedules` (10) every-second schedules for `--seconds` (60) fired by three
  processes with workers on one file (no leader: each tries every fire, one records it); for each
  task, its start (`started_at`) less its planned fire time; p50, p99, max. Also checked: one task
  per planned fire, none twice.
- idle: a process with 1,000 schedules that fire next year, and one with none, for `--idle-s`
  (30) seconds each: the CPU time the schedules add, as a share of one core.

Run with `.venv/bin/python -m benchmarks.schedules [--seconds N] [--schedules K]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conveyor import Conveyor, Settings, TaskContext
from conveyor.schedule_record import scheduled_for

PROCESS = """
import asyncio, sys, time
from pathlib import Path
from benchmarks.schedules import make_yard

async def main(data_dir, seconds):
    async with make_yard(Path(data_dir)):
        await asyncio.sleep(seconds)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def make_yard(data_dir: Path) -> Conveyor:
    yard = Conveyor(Settings(data_dir=data_dir, process_warmup=False))

    @yard.task(name="bench.tick")
    async def tick(ctx: TaskContext) -> None:
        return None

    return yard


def spawn(data_dir: Path, seconds: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", PROCESS, str(data_dir), str(seconds)], env=env)


async def create(data_dir: Path, count: int, fields: dict[str, object]) -> None:
    async with make_yard(data_dir) as yard:
        yard.run_workers = False
        for n in range(count):
            await yard.schedules.create(f"s{n}", {"task": "bench.tick", **fields}, owner="")


async def read_tasks(data_dir: Path) -> list[tuple[str, float, float]]:
    yard = make_yard(data_dir)
    yard.run_workers = False
    async with yard:
        records = await yard.store.list_tasks(owner=None, limit=1_000_000)
    found = []
    for record in records:
        planned = scheduled_for(record.idempotency_key)
        if planned is not None and record.started_at is not None:
            schedule = (record.idempotency_key or "").partition("@")[0]
            found.append((schedule, planned, record.started_at - planned))
    return found


def lateness(seconds: float, schedules: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(folder)
        asyncio.run(create(data_dir, schedules, {"every_s": 1}))
        started = time.time()
        processes = [spawn(data_dir, seconds) for _ in range(3)]
        for process in processes:
            process.wait()
        found = asyncio.run(read_tasks(data_dir))
    late = sorted(delay for _, planned, delay in found if planned > started + 5)  # past start-up
    by_schedule: dict[str, list[float]] = {}
    for schedule, planned, _ in found:
        by_schedule.setdefault(schedule, []).append(planned)
    gaps = doubles = 0
    for times in by_schedule.values():
        times.sort()
        steps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
        gaps += sum(1 for step in steps if step > 1)
        doubles += sum(1 for step in steps if step < 1)
    print(f"lateness, 3 processes, {schedules} schedules every second, {seconds:.0f} s")
    print(f"tasks {len(found)} from {len(by_schedule)} schedules; gaps {gaps}, twice {doubles}")
    q = statistics.quantiles(late, n=100)
    print("| fires | p50 | p99 | max |")
    print("| --- | --- | --- | --- |")
    p50, p99, top = q[49] * 1000, q[98] * 1000, late[-1] * 1000
    print(f"| {len(late)} | {p50:.1f} ms | {p99:.1f} ms | {top:.1f} ms |")


def idle(seconds: float, count: int) -> None:
    used: dict[int, float] = {}
    for n in (0, count):
        with tempfile.TemporaryDirectory() as folder:
            data_dir = Path(folder)
            asyncio.run(create(data_dir, n, {"cron": "0 0 1 1 *"}))
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            spawn(data_dir, seconds).wait()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            used[n] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    extra = used[count] - used[0]
    print(
        f"idle, {seconds:.0f} s: CPU {used[0]:.2f} s with no schedule, {used[count]:.2f} s "
        f"with {count}: {100 * extra / seconds:.2f} % of a core for the schedules "
        "(start-up included in both)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--schedules", type=int, default=10)
    parser.add_argument("--idle-s", type=float, default=30)
    parser.add_argument("--idle-schedules", type=int, default=1000)
    options = parser.parse_args()
    lateness(options.seconds, options.schedules)
    idle(options.idle_s, options.idle_schedules)


if __name__ == "__main__":
    main()
