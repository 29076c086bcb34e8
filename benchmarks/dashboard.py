"""The dashboard with a long history: server time, bytes on the wire and first render in chromium.

A SQLite store is filled with `--finished` completed tasks and a hundredth as many failed ones
(rows written straight into the file, with their counts; they finished a day ago and
`CONVEYOR_RESULT_TTL=none` keeps them). `conveyor serve` serves it; each page is requested
`--requests` times one after the other, gzip accepted:

- time: from sending the request to the last byte, on loopback (the server's time plus a
  loopback round trip: an upper bound of the server's time); p50 and p95;
- bytes: the body as sent (compressed);
- first render: Debian's chromium (Playwright, headless) loads the page `--renders` times; the
  median of the document being ready (parsed, its script run) and of the load event (styles
  and scripts loaded), from the browser's navigation timing (headless chromium reports no
  paint timing).

Targets (1,000,000 finished tasks): the tasks page and the overview at most 100 ms at p95, a
page at most 100 KB compressed, first render within 1 s.

Run with `.venv/bin/python -m benchmarks.dashboard [--finished N]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from .retention import fill
from .support import free_port, serve


def add_failed(data_dir: Path, n: int) -> str:
    """``n`` failed tasks after the completed ones, with an error and its traceback; the id of
    one of them."""
    day_ago = time.time() - 86400
    error = '{"type":"ValueError","message":"boom","traceback":"Traceback (most recent call last)"}'
    with sqlite3.connect(data_dir / "conveyor.db") as db:
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO tasks (id, name, owner, status, args, error, attempts, max_attempts, "
            "created_at, started_at, finished_at, run_at) SELECT "
            "printf('ffffffff-%04x-7000-8000-%012x', i / 65536, i), 'demo.fail', '', 'failed', "
            '\'{"message":"boom"}\', ?, 1, 1, ?, ?, ?, ? FROM n',
            (n, error, day_ago, day_ago, day_ago, day_ago),
        )
        db.execute(
            "INSERT INTO task_counts (owner, name, status, n) VALUES ('', 'demo.fail', 'failed', "
            "?) ON CONFLICT DO UPDATE SET n = n + excluded.n",
            (n,),
        )
        (task_id,) = db.execute(
            "SELECT id FROM tasks WHERE status = 'failed' ORDER BY seq LIMIT 1"
        ).fetchone()
    return str(task_id)


def timed(url: str, path: str, requests: int) -> dict[str, float]:
    times: list[float] = []
    sizes: list[int] = []
    with httpx.Client(base_url=url, timeout=60, headers={"accept-encoding": "gzip"}) as client:
        client.get(path)  # warm: templates compiled, pages of the file cached
        for _ in range(requests):
            started = time.perf_counter()
            with client.stream("GET", path) as response:
                sent = sum(len(chunk) for chunk in response.iter_raw())
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (path, response.status_code)
            sizes.append(sent)
    return {
        "p50": statistics.median(times),
        "p95": statistics.quantiles(times, n=20)[18],
        "kb": statistics.median(sizes) / 1024,
        "gzip": response.headers.get("content-encoding") == "gzip",
    }


def rendered(url: str, renders: int) -> dict[str, float]:
    executable = shutil.which("chromium")
    if executable is None:
        raise SystemExit("first render needs Debian's chromium (make test installs it)")
    paints: list[float] = []
    loads: list[float] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            for _ in range(renders):
                page = browser.new_page()
                page.goto(url, wait_until="load")
                timings = page.evaluate(
                    "() => { const n = performance.getEntriesByType('navigation')[0];"
                    " return {load: n.loadEventEnd, paint: n.domContentLoadedEventEnd}; }"
                )
                paints.append(timings["paint"])
                loads.append(timings["load"])
                page.close()
        finally:
            browser.close()
    return {"paint": statistics.median(paints), "load": statistics.median(loads)}


def main(finished: int, requests: int, renders: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        started = time.perf_counter()
        fill(data_dir, finished)
        failed_id = add_failed(data_dir, max(finished // 100, 1))
        filled_s = time.perf_counter() - started
        with sqlite3.connect(data_dir / "conveyor.db") as db:
            (middle,) = db.execute("SELECT max(seq) / 2 FROM tasks").fetchone()
        port = free_port()
        env = {
            **os.environ,
            "CONVEYOR_DATA_DIR": tmp,
            "CONVEYOR_RESULT_TTL": "none",
            "CONVEYOR_LOG_LEVEL": "warning",
        }
        process = serve([sys.executable, "-m", "conveyor", "serve", "--port", str(port)], port, env)
        url = f"http://127.0.0.1:{port}"
        pages = {
            "overview `/dashboard/`": "/dashboard/",
            "tasks, newest": "/dashboard/tasks",
            "tasks, a page in the middle": f"/dashboard/tasks?cursor={middle}",
            "tasks, failed only": "/dashboard/tasks?status=failed",
            "tasks, one type": "/dashboard/tasks?name=demo.echo",
            "tasks, a type with no task": "/dashboard/tasks?name=demo.cpu",
            "one task (failed, traceback)": f"/dashboard/tasks/{failed_id}",
            "batches": "/dashboard/batches",
            "workers": "/dashboard/workers",
        }
        try:
            measured = {name: timed(url, path, requests) for name, path in pages.items()}
            renders_of = {
                name: rendered(url + pages[name], renders)
                for name in ("overview `/dashboard/`", "tasks, newest")
            }
        finally:
            process.terminate()
            process.wait(60)
    total = finished + max(finished // 100, 1)
    print(f"\n{total:,} finished tasks in the SQLite store (filled in {filled_s:.0f} s); ")
    print(f"{requests} requests per page, gzip accepted; {renders} renders in headless chromium\n")
    print("| page | p50 (ms) | p95 (ms) | sent (KB) | gzip |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in measured.items():
        print(
            f"| {name} | {row['p50']:.1f} | {row['p95']:.1f} | {row['kb']:.1f} | "
            f"{'yes' if row['gzip'] else 'no'} |"
        )
    print("\n| page | document ready (ms) | load event (ms) |")
    print("| --- | --- | --- |")
    for name, row in renders_of.items():
        print(f"| {name} | {row['paint']:.0f} | {row['load']:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--renders", type=int, default=5)
    args = parser.parse_args()
    main(args.finished, args.requests, args.renders)
