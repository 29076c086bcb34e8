"""CSV statistics of a generated file (default 10 million rows x 10 mixed columns, ~1 GB, ~1 %
empty cells): the direct library call vs the same file through `POST /csv-stats`.

- direct: `conveyor.jobs.csvstats.csv_statistics(path)` in this process (DuckDB);
- service: the file uploaded to `conveyor serve`, computed by the embedded engine in a worker
  process; reported end to end (upload included) and as the task's own run time, with the worker
  process's peak RSS.

Run with `python benchmarks/csvstats.py [--rows N]`.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from run import _serve, free_port  # type: ignore[import-not-found]

GENERATE = """
COPY (
  SELECT
    i AS id,
    CASE WHEN hash(i, 1) % 100 = 0 THEN NULL ELSE round((hash(i, 2) % 1000000) / 100.0, 2) END
      AS amount,
    CASE WHEN hash(i, 3) % 100 = 0 THEN NULL ELSE (hash(i, 4) % 500)::INTEGER END AS quantity,
    CASE WHEN hash(i, 5) % 100 = 0 THEN NULL ELSE hash(i, 6) % 2 = 0 END AS paid,
    CASE WHEN hash(i, 7) % 100 = 0 THEN NULL
         ELSE DATE '2015-01-01' + (hash(i, 8) % 3650)::INTEGER END AS day,
    TIMESTAMP '2020-01-01' + to_seconds((hash(i, 9) % 100000000)::BIGINT) AS created,
    CASE WHEN hash(i, 10) % 100 = 0 THEN NULL ELSE 'customer-' || (hash(i, 11) % 2000000) END
      AS customer,
    ['Oslo', 'Rome', 'Lima', 'Pune', 'Kyiv', 'Baku'][(hash(i, 12) % 6)::INTEGER + 1] AS city,
    CASE WHEN hash(i, 13) % 100 = 0 THEN NULL ELSE (hash(i, 14) % 1000) / 7.0 END AS ratio,
    repeat('x', (hash(i, 15) % 20)::INTEGER) AS note
  FROM range({rows}) t(i)
) TO '{path}' (HEADER)
"""


def generate(path: Path, rows: int) -> None:
    with duckdb.connect() as con:
        con.execute("SET enable_progress_bar = false")
        con.execute(GENERATE.format(rows=rows, path=path))


def direct(path: Path) -> tuple[float, int]:
    code = (
        "import resource, sys, time, json\n"
        "from pathlib import Path\n"
        "from conveyor.jobs.csvstats import csv_statistics\n"
        "started = time.perf_counter()\n"
        "csv_statistics(Path(sys.argv[1]))\n"
        "print(json.dumps([time.perf_counter() - started,"
        " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout
    import json

    seconds, peak_kb = json.loads(out.strip().splitlines()[-1])
    return seconds, peak_kb


def worker_peak_kb(server_pid: int) -> int:
    peaks = []
    children = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True)
    for pid in children.stdout.split():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]))
        except OSError:
            continue
    return max(peaks, default=0)


def service(path: Path, folder: Path) -> tuple[float, float, int]:
    port = free_port()
    env = {
        **os.environ,
        "CONVEYOR_DATA_DIR": str(folder),
        "CONVEYOR_MAX_UPLOAD_BYTES": str(4 * 1024**3),
    }
    command = [sys.executable, "-m", "conveyor", "serve", "--log-level", "warning"]
    server = _serve([*command, "--no-access-log", "--port", str(port)], port, env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            started = time.perf_counter()
            # curl streams the file (httpx's streaming upload costs more CPU than the server)
            upload = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "-X",
                    "POST",
                    "-T",
                    str(path),
                    "-H",
                    "content-type: text/csv",
                    f"http://127.0.0.1:{port}/csv-stats",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            import json

            task_id = json.loads(upload.stdout)["id"]
            with client.stream("GET", f"/tasks/{task_id}/events") as stream:
                for _ in stream.iter_lines():
                    pass
            elapsed = time.perf_counter() - started
            task = client.get(f"/tasks/{task_id}").json()
        assert task["status"] == "completed", task["error"]
        from datetime import datetime

        run = (
            datetime.fromisoformat(task["finished_at"]) - datetime.fromisoformat(task["started_at"])
        ).total_seconds()
        return elapsed, run, worker_peak_kb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        generate(path, options.rows)
        size_gb = path.stat().st_size / 1e9
        direct_s, direct_peak = direct(path)
        e2e_s, run_s, worker_peak = service(path, Path(tmp) / "service")
    print(f"\n{options.rows:,} rows x 10 columns, {size_gb:.2f} GB")
    print(
        f"direct csv_statistics()          {direct_s:6.1f} s   peak RSS {direct_peak / 1024:.0f} MB"
    )
    print(
        f"service: the task's own run      {run_s:6.1f} s   {run_s / direct_s:.2f}x direct "
        f"(target ≤ 1.25)   worker peak RSS {worker_peak / 1024:.0f} MB (target ≤ 512)"
    )
    print(f"service: upload + run            {e2e_s:6.1f} s   {e2e_s / direct_s:.2f}x direct")
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
