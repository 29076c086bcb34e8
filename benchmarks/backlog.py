"""The embedded engine draining a deep backlog: N `demo.echo` tasks are committed first (in
transactions of 10,000), then the engine starts and drains them; prints the rate of the first
`--drain` tasks at each depth, and the cost of `/health`'s counts at that depth.

Run: `.venv/bin/python -m benchmarks.backlog [--depths 10000 100000 1000000] [--drain 20000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from conveyor import Settings
from conveyor.service import build_yard

CHUNK = 10_000


async def drain_rate(depth: int, drain: int, data_dir: Path) -> tuple[float, float]:
    """``(tasks/s over the first ``drain`` tasks, ms for one count_by_status)``."""
    settings = Settings(data_dir=data_dir, concurrency=64, max_queued=None)
    yard = build_yard(settings)
    yard.run_workers = False  # nothing runs while the backlog builds
    ids: list[str] = []
    async with yard:
        for start in range(0, depth, CHUNK):
            items = [{"value": i} for i in range(start, min(start + CHUNK, depth))]
            ids.extend(handle.id for handle in await yard.submit_many("demo.echo", items))
    yard = build_yard(settings)
    async with yard:
        started = time.perf_counter()
        await yard.wait(ids[min(drain, depth) - 1])
        rate = min(drain, depth) / (time.perf_counter() - started)
        counted = time.perf_counter()
        await yard.store.count_by_status()
        count_ms = (time.perf_counter() - counted) * 1e3
    return rate, count_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--drain", type=int, default=20_000)
    options = parser.parse_args()
    print(f"{'queued':>10} {'drain of the first':>20} {'tasks/s':>10} {'counts':>10}")
    for depth in options.depths:
        data_dir = Path(tempfile.mkdtemp(prefix="conveyor-backlog-"))
        try:
            rate, count_ms = asyncio.run(drain_rate(depth, options.drain, data_dir))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        print(f"{depth:>10,} {min(options.drain, depth):>20,} {rate:>10,.0f} {count_ms:>8.2f} ms")


if __name__ == "__main__":
    main()
