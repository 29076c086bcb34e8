"""Batches in the core: 100,000 `bench.echo` items submitted as one batch against the same number
submitted one by one, in one run, on the embedded engine (one SQLite file, workers in the
process).

For each way: the time to commit the backlog (a batch: one call; single submissions: all of them
at once, as concurrent API clients would), then the drain rate once workers start, and, for the
batch, the cost of reading it (`yard.batches.get`, p50/p95) while it drains. Prints a table and
the batch/single drain ratio (the target: at least 0.9 of it, no per-batch bottleneck).

Run with `.venv/bin/python -m benchmarks.batches [--items N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from conveyor import Conveyor, Settings, TaskContext


def make_yard(data_dir: Path, *, run_workers: bool) -> Conveyor:
    settings = Settings(data_dir=data_dir, max_queued=None, process_warmup=False)
    yard = Conveyor(settings, run_workers=run_workers)

    @yard.task(name="bench.echo")
    async def echo(ctx: TaskContext, value: int) -> int:
        return value

    return yard


async def drain_rate(data_dir: Path, n: int, batch_id: str | None) -> tuple[float, list[float]]:
    """Start workers on the backlog in ``data_dir``; tasks per second until it is empty, and
    the batch reads' times (ms) taken meanwhile."""
    reads: list[float] = []
    async with make_yard(data_dir, run_workers=True) as yard:
        started = time.perf_counter()
        while True:
            if batch_id is not None:
                t0 = time.perf_counter()
                batch = await yard.batches.get(batch_id)
                reads.append((time.perf_counter() - t0) * 1000)
                if not batch.active:
                    break
            else:
                counts = await yard.store.count_by_status()
                if counts["completed"] >= n:
                    break
            await asyncio.sleep(0.05)
        return n / (time.perf_counter() - started), reads


async def one_way(items: int, *, as_batch: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        batch_id = None
        async with make_yard(data_dir, run_workers=False) as yard:
            started = time.perf_counter()
            if as_batch:
                batch = await yard.batch("bench.echo", [{"value": i} for i in range(items)])
                batch_id = batch.id
            else:
                await asyncio.gather(
                    *(yard.submit("bench.echo", {"value": i}) for i in range(items))
                )
            submit_s = time.perf_counter() - started
        rate, reads = await drain_rate(data_dir, items, batch_id)
        result = {"submit_s": submit_s, "drain_per_s": rate}
        if reads:
            result["read_p50_ms"] = statistics.median(reads)
            result["read_p95_ms"] = (
                statistics.quantiles(reads, n=20)[18] if len(reads) > 20 else max(reads)
            )
        return result


async def main(items: int, rounds: int) -> None:
    rows: dict[str, list[dict[str, float]]] = {"batch": [], "single": []}
    for _ in range(rounds):  # interleaved: the machine's drift hits both ways alike
        rows["single"].append(await one_way(items, as_batch=False))
        rows["batch"].append(await one_way(items, as_batch=True))
    print(f"\n{items:,} bench.echo tasks, {rounds} rounds (medians)\n")
    print("| way | commit the backlog (s) | drain (tasks/s) | batch read p50 / p95 (ms) |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for way, found in rows.items():
        drain = statistics.median(r["drain_per_s"] for r in found)
        medians[way] = drain
        submit = statistics.median(r["submit_s"] for r in found)
        reads = (
            f"{statistics.median(r['read_p50_ms'] for r in found):.2f} / "
            f"{statistics.median(r['read_p95_ms'] for r in found):.2f}"
            if "read_p50_ms" in found[0]
            else "-"
        )
        print(f"| {way} | {submit:.2f} | {drain:,.0f} | {reads} |")
    print(f"\nbatch drain / single drain: {medians['batch'] / medians['single']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.items, args.rounds))
