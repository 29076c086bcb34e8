"""One Celery pool process's work per message, without Celery: what Conveyor adds to each task.

A pool process of ``conveyor worker`` receives each message on its main thread and hands it to
its runtime's event loop thread, which claims the task in PostgreSQL (carrying the previous
task's outcome), runs it and answers back. This benchmark starts that runtime as a pool process
does, submits N ``demo.echo`` tasks, then feeds their ids in turn, in alternating rounds:

- ``handed over``: from the main thread, as Celery calls it (``CeleryEngine.handle``);
- ``on the loop``: one coroutine on the loop thread claims and runs them all (no thread hop),
  which shows what the hand-over itself costs per message.

It prints the process's CPU time (both threads) and the wall time per message; PostgreSQL's
own CPU is not counted. Run: `.venv/bin/python -m benchmarks.studies.celery_message_path [-n N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.services import PostgresServer, RedisServer

from conveyor import Settings
from conveyor.engines import celery_worker
from conveyor.service import build_yard


async def submit(settings: Settings, n: int) -> list[str]:
    yard = build_yard(settings, run_workers=False)
    await yard.start()
    try:
        ids: list[str] = []
        for chunk in range(0, n, 200):
            submitted = await asyncio.gather(
                *(yard.submit("demo.echo", {"value": i}) for i in range(chunk, min(n, chunk + 200)))
            )
            ids += [record.id for record, _ in submitted]
        return ids
    finally:
        await yard.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=8000, help="tasks in all (split over 4 rounds)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    pg = PostgresServer().start()
    broker = RedisServer(work / "redis").start()
    try:
        settings = Settings(
            engine="celery",
            database_url=pg.create_database(),
            broker_url=broker.url(),
            celery_queue=f"bench-{uuid.uuid4().hex[:8]}",  # nobody consumes the messages
            data_dir=work,
            max_queued=None,
        )
        ids = asyncio.run(submit(settings, args.n))
        yard = build_yard(settings, run_workers=True)
        runtime = celery_worker.runtime_for(yard)  # as a pool process starts it
        figures: dict[str, list[tuple[float, float]]] = {"handed over": [], "on the loop": []}
        rounds = 4
        for r in range(rounds):
            part = ids[r * len(ids) // rounds : (r + 1) * len(ids) // rounds]
            way = "handed over" if r % 2 == 0 else "on the loop"
            cpu, wall = time.process_time(), time.perf_counter()
            if way == "handed over":
                for task_id in part:
                    assert runtime.handle("demo.echo", task_id)
            else:

                async def all_on_the_loop(part: list[str] = part) -> None:
                    for task_id in part:
                        assert await runtime.run_message("demo.echo", task_id)

                asyncio.run_coroutine_threadsafe(all_on_the_loop(), runtime.loop).result()
            cpu_ms = 1000 * (time.process_time() - cpu) / len(part)
            wall_ms = 1000 * (time.perf_counter() - wall) / len(part)
            figures[way].append((cpu_ms, wall_ms))
            print(f"round {r + 1}, {way}: {cpu_ms:.3f} ms CPU, {wall_ms:.3f} ms wall per message")
        celery_worker.stop_runtime(yard)
        print(f"\n{len(ids)} demo.echo messages, one pool process's runtime, medians:")
        for way, rows in figures.items():
            cpu_ms = statistics.median(c for c, _ in rows)
            wall_ms = statistics.median(w for _, w in rows)
            print(f"  {way:<12} {cpu_ms:.3f} ms CPU   {wall_ms:.3f} ms wall per message")
    finally:
        broker.stop()
        pg.stop()
        pg.remove()


if __name__ == "__main__":
    main()
