"""CSV statistics of a generated file (default 10 million rows x 10 mixed columns, ~1 GB, ~1 %
empty cells): the direct library call vs the same file through `POST /csv-stats`.

- direct: `conveyor.jobs.csvstats.csv_statistics(path)` in this process (DuckDB);
- service: the file uploaded to `conveyor serve` (raw body), computed by the embedded engine in a
  worker process; reported end to end (from the first byte sent to the last progress event), the
  upload alone (until the 202), and the task's own run, with the worker process's peak RSS;
- floor: writing the same number of bytes from memory to a new file beside the service's data
  (1 MB blocks, 3 times after the rounds), what any upload must at least pay to land on disk. On
  this machine's VM that varies from 0.4 to 2.6 s per GB: memory the guest frees is handed back
  to the host, which faults it in again when the page cache next takes it.

Rounds alternate the two; medians (and ranges) are printed.
Run with `.venv/bin/python -m benchmarks.csvstats [--rows N] [--rounds K]`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import duckdb
import httpx

from .support import free_port, serve

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
    seconds, peak_kb = json.loads(out.strip().splitlines()[-1])
    return seconds, peak_kb


def write_floor(folder: Path, size: int) -> float:
    """Seconds to write ``size`` bytes from memory to a new file in ``folder`` (then removed)."""
    block = os.urandom(1 << 20)
    target = folder / "floor.bin"
    started = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    target.unlink()
    os.sync()
    return seconds


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


def upload(port: int, path: Path) -> str:
    """POST the file as the raw body; the task's id.

    The standard library's client sends 1 MB blocks (1 GB in 0.4 s to a bare socket reader on
    this machine); ``curl -T`` sends 64 KB blocks and takes 1.5 s for the same, which would
    measure curl rather than the service.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, blocksize=1 << 20, timeout=600)
    with path.open("rb") as body:
        headers = {"content-type": "text/csv", "content-length": str(path.stat().st_size)}
        connection.request("POST", "/csv-stats", body=body, headers=headers)
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    if response.status != 202:
        raise RuntimeError(f"upload answered {response.status}: {answer[:500]!r}")
    task_id: str = json.loads(answer)["id"]
    return task_id


def service_round(port: int, path: Path) -> tuple[float, float, float]:
    """(upload, upload + run, the task's own run) in seconds."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        started = time.perf_counter()
        task_id = upload(port, path)
        uploaded = time.perf_counter() - started
        with client.stream("GET", f"/tasks/{task_id}/events") as stream:
            for _ in stream.iter_lines():
                pass
        elapsed = time.perf_counter() - started
        task = client.get(f"/tasks/{task_id}").json()
        client.delete(f"/tasks/{task_id}")
    assert task["status"] == "completed", task["error"]
    run = (
        datetime.fromisoformat(task["finished_at"]) - datetime.fromisoformat(task["started_at"])
    ).total_seconds()
    return uploaded, elapsed, run


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({min(values):.2f} to {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        generate(path, options.rows)
        os.sync()  # the generated file's write-back must not land in a measured run
        size_gb = path.stat().st_size / 1e9
        port = free_port()
        env = {
            **os.environ,
            "CONVEYOR_DATA_DIR": str(Path(tmp) / "service"),
            "CONVEYOR_MAX_UPLOAD_BYTES": str(4 * 1024**3),
        }
        command = [sys.executable, "-m", "conveyor", "serve", "--log-level", "warning"]
        server = serve([*command, "--no-access-log", "--port", str(port)], port, env)
        direct_s: list[float] = []
        uploads: list[float] = []
        e2e: list[float] = []
        runs: list[float] = []
        direct_peak = 0
        try:
            for _ in range(options.rounds):  # alternate, so both see the same machine
                seconds, peak = direct(path)
                direct_s.append(seconds)
                direct_peak = max(direct_peak, peak)
                uploaded, elapsed, run = service_round(port, path)
                uploads.append(uploaded)
                e2e.append(elapsed)
                runs.append(run)
                os.sync()  # the upload's write-back stays in its own round
                print(
                    f"round: direct {seconds:.2f} s, upload {uploaded:.2f} s, "
                    f"upload + run {elapsed:.2f} s ({elapsed / seconds:.2f}x)",
                    flush=True,
                )
            worker_peak = worker_peak_kb(server.pid)
            # after the rounds: a write (and the pages its removal frees) within a round would
            # change how fast the next upload writes
            floors = [write_floor(Path(tmp), path.stat().st_size) for _ in range(3)]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait()
    ratio = [e / d for e, d in zip(e2e, direct_s, strict=True)]
    own = [r / d for r, d in zip(runs, direct_s, strict=True)]
    print(f"\n{options.rows:,} rows x 10 columns, {size_gb:.2f} GB, medians of {options.rounds}")
    peak_mb = direct_peak / 1024
    print(f"direct csv_statistics()        {spread(direct_s)} s   peak RSS {peak_mb:.0f} MB")
    print(f"service: upload (202)          {spread(uploads)} s")
    print(f"floor: writing as many bytes   {spread(floors)} s (no network, no parsing)")
    print(f"service: the task's own run    {spread(runs)} s   {spread(own)}x direct")
    print(
        f"service: upload + run          {spread(e2e)} s   {spread(ratio)}x direct (target ≤ 1.25)"
    )
    print(f"worker process peak RSS        {worker_peak / 1024:.0f} MB (target ≤ 512)")


if __name__ == "__main__":
    main()
