"""Conveyor's core benchmarks; prints a table. Run with `make bench`.

- end-to-end: N `demo.echo` tasks submitted from Python and drained by the embedded engine;
- HTTP: `POST /tasks` under wrk (64 connections, another process) vs a bare FastAPI endpoint,
  medians of alternating rounds;
- latency: submit → result readable, one task at a time, with the worker in the same process and
  in a `conveyor worker` process on the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from conveyor import Settings, TaskStatus
from conveyor.service import build_yard

from .support import free_port, serve


async def end_to_end(n: int, data_dir: Path, concurrency: int) -> float:
    yard = build_yard(Settings(data_dir=data_dir, concurrency=concurrency, max_queued=None))
    echo = yard.task_types["demo.echo"]
    async with yard:
        started = time.perf_counter()
        handles = await asyncio.gather(*(echo.submit(i) for i in range(n)))
        for handle in handles[-1:]:
            await handle.wait()
        while (await yard.store.count_by_status())[TaskStatus.COMPLETED] < n:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
    return n / elapsed


async def latency(n: int, data_dir: Path, *, worker_apart: bool = False) -> tuple[float, float]:
    """p50 and p99 (ms) of submit → result readable, one task at a time; with ``worker_apart``
    the worker is a `conveyor worker` process on the same file, and this one only submits."""
    yard = build_yard(Settings(data_dir=data_dir))
    echo = yard.task_types["demo.echo"]
    worker = None
    if worker_apart:
        yard.run_workers = False
        env = {**os.environ, "CONVEYOR_DATA_DIR": str(data_dir)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
    try:
        async with yard:
            samples = await _samples(yard, echo, n)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait()
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(len(samples) * 0.99)] * 1e3


WARM_UP_S = 1.5


async def _samples(yard: Any, echo: Any, n: int) -> list[float]:
    """``n`` samples after a warm-up: 50 tasks and 1.5 s from the first result (the process
    pool's children import Conveyor meanwhile; each submit → result took 4.7 ms while they did,
    0.4 ms after)."""
    samples: list[float] = []
    first: float | None = None
    i = 0
    while len(samples) < n:
        started = time.perf_counter()
        handle = await echo.submit(i)
        record = await handle.wait()
        done = time.perf_counter()
        assert record.result == i
        first = first or done
        if i >= 50 and done - first >= WARM_UP_S:
            samples.append(done - started)
        i += 1
    return samples


def _wrk(url: str, seconds: int, body: str) -> tuple[float, str]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} non-2xx responses from {url}")
    return rps, p99


def _drained(port: int) -> None:
    """Wait until a server's queue is empty, so its workers do not load the next run."""
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tasks = httpx.get(f"http://127.0.0.1:{port}/health").json()["tasks"]
        if tasks["queued"] == 0 and tasks["running"] == 0:
            return
        time.sleep(0.2)


def http(seconds: int, rounds: int, data_dir: Path) -> dict[str, tuple[float, str]]:
    """Median requests/s (and the p99 of that run) over alternating rounds of each target."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk (make bench installs it)")
    env = {**os.environ, "CONVEYOR_MAX_QUEUED": "100000000"}
    body = '{"name":"demo.echo","args":{"value":1}}'
    uvicorn = [sys.executable, "-m", "uvicorn", "--log-level", "warning", "--no-access-log"]
    conveyor = [
        *[sys.executable, "-m", "conveyor", "serve", "--log-level", "warning", "--no-access-log"]
    ]
    targets = {
        "bare FastAPI endpoint": ([*uvicorn, "benchmarks.bare_app:app"], "/bare"),
        "API only": ([*conveyor, "--no-workers"], "/tasks"),
        "API + workers": ([*conveyor, "--workers"], "/tasks"),
    }
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    runs: dict[str, list[tuple[float, str]]] = {label: [] for label in targets}
    try:
        for label, (command, _) in targets.items():
            port = free_port()
            label_env = env | {"CONVEYOR_DATA_DIR": str(data_dir / label.replace(" ", ""))}
            servers[label] = (serve([*command, "--port", str(port)], port, label_env), port)
        for _ in range(rounds):
            for label, (_, path) in targets.items():
                port = servers[label][1]
                runs[label].append(_wrk(f"http://127.0.0.1:{port}{path}", seconds, body))
                if label == "API + workers":
                    _drained(port)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait()
    return {label: sorted(results)[len(results) // 2] for label, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--http-seconds", type=int, default=5)
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--skip-http", action="store_true")
    options = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rate = asyncio.run(end_to_end(options.tasks, Path(tmp) / "e2e", options.concurrency))
        rows.append((f"end-to-end, {options.tasks} demo.echo", f"{rate:,.0f} tasks/s", "≥ 5,000"))
        p50, p99 = asyncio.run(latency(options.latency_samples, Path(tmp) / "latency"))
        rows.append(("submit → result, p50", f"{p50:.2f} ms", "≤ 1 ms"))
        rows.append(("submit → result, p99", f"{p99:.2f} ms", "≤ 5 ms"))
        p50, p99 = asyncio.run(
            latency(options.latency_samples, Path(tmp) / "apart", worker_apart=True)
        )
        rows.append(("submit → result, worker apart, p50", f"{p50:.2f} ms", "≤ 1 ms"))
        rows.append(("submit → result, worker apart, p99", f"{p99:.2f} ms", "≤ 3 ms"))
        if not options.skip_http:
            results = http(options.http_seconds, options.http_rounds, Path(tmp) / "http")
            bare_rps, bare_p99 = results["bare FastAPI endpoint"]
            rows.append(
                ("bare FastAPI POST, 64 conns", f"{bare_rps:,.0f} req/s", f"p99 {bare_p99}")
            )
            for label, target in (("API only", "≥ 65 %"), ("API + workers", "≥ 50 %")):
                rps, p99 = results[label]
                rows.append((f"POST /tasks ({label})", f"{rps:,.0f} req/s", f"p99 {p99}"))
                rows.append(("  ratio to bare", f"{rps / bare_rps:.0%}", target))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'benchmark':<{width}}  {'measured':>16}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>16}  {target}")


if __name__ == "__main__":
    main()
