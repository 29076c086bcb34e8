"""`GET /metrics` with 100 task types: the time of a scrape that reads the store (its one-second
cache expired), measured from the client, against the target of 50 ms.

`conveyor serve --app benchmarks.metrics:yard` serves 100 task types; 20 tasks of each are
submitted as batches and run. Then `--scrapes` scrapes are timed, each a little over a second
after the last, so that every one reads the store and builds the whole text. Prints p50/p95 and
the number of series.

Run with `.venv/bin/python -m benchmarks.metrics [--types N] [--scrapes N]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import httpx

from conveyor import Conveyor, Settings

from .support import free_port, serve

TYPES = int(os.environ.get("BENCH_METRICS_TYPES", "100"))


async def _echo(value: int) -> int:
    return value


yard = Conveyor(Settings())
for number in range(TYPES):
    yard.task(name=f"bench.type{number:03d}")(_echo)


def main(types: int, scrapes: int) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "CONVEYOR_DATA_DIR": tmp,
            "CONVEYOR_LOG_LEVEL": "warning",
            "BENCH_METRICS_TYPES": str(types),
        }
        args = [sys.executable, "-m", "conveyor", "serve", "--port", str(port)]
        process = serve([*args, "--app", "benchmarks.metrics:yard"], port, env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                for number in range(types):
                    items = [{"value": i} for i in range(20)]
                    body = {"name": f"bench.type{number:03d}", "items": items}
                    assert client.post("/batches", json=body).status_code == 202
                times: list[float] = []
                text = ""
                for _ in range(scrapes):
                    time.sleep(1.05)  # past the one-second cache: each scrape reads the store
                    started = time.perf_counter()
                    response = client.get("/metrics")
                    times.append((time.perf_counter() - started) * 1000)
                    text = response.text
        finally:
            process.terminate()
            process.wait(30)
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    p95 = statistics.quantiles(times, n=20)[18]
    print(f"\n/metrics with {types} task types ({series} series), {scrapes} uncached scrapes\n")
    print("| p50 (ms) | p95 (ms) | target p95 |")
    print("| --- | --- | --- |")
    print(f"| {statistics.median(times):.1f} | {p95:.1f} | ≤ 50 ms |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", type=int, default=100)
    parser.add_argument("--scrapes", type=int, default=20)
    parsed = parser.parse_args()
    main(parsed.types, parsed.scrapes)
