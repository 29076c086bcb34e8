"""The fault suite, for minutes: the embedded engine (`conveyor serve` and a `conveyor worker`
on one SQLite file) runs round after round of the suite's mixed workload while a fault is
injected in each round, in turn: the worker killed, a process-pool child killed, the file's
write lock held past the busy timeout, the data folder's disk filled for a few seconds (a tmpfs
of its own; needs root). After each round every task must have ended, none twice,
the per-type limit held. Prints what it counted.

Run: `.venv/bin/python -m benchmarks.soak [--minutes 3]` (from the repository root).
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.support.fault_yard import THREAD_LIMIT
from tests.support.faults import (
    Deployment,
    assert_outcomes,
    cancel_delayed,
    fill,
    most_at_once,
    pool_children,
    runs,
    small_disk_at,
    submit_all,
    wait_until,
    workload,
)

BUSY_TIMEOUT_S = 1.0
FAULTS = ("kill the worker", "kill a pool child", "hold the write lock", "fill the disk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0)
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="conveyor-soak-"))
    with small_disk_at(root / "data", "256m") as work:
        soak(work, root / "runs.log", options.minutes)


def soak(work: Path, log: Path, minutes: float) -> None:
    deployment = Deployment(
        work, CONVEYOR_CONCURRENCY="8", CONVEYOR_SQLITE_BUSY_TIMEOUT_S=str(BUSY_TIMEOUT_S)
    )
    statuses: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    injected: Counter[str] = Counter()
    settle_s: list[float] = []
    kills: dict[int, float] = {}
    deadline = time.monotonic() + minutes * 60
    rounds = 0
    try:
        server = deployment.api()
        worker = deployment.worker("--concurrency", "8")
        with deployment.client() as client:
            while time.monotonic() < deadline:
                fault = FAULTS[rounds % len(FAULTS)]
                accepted = submit_all(client, workload(str(log)))
                cancelled = cancel_delayed(client, accepted)
                time.sleep(1.0)  # into the round's work
                if fault == "kill the worker":
                    kills[worker.popen.pid] = time.time()
                    worker.kill()
                    worker = deployment.worker("--concurrency", "8")
                elif fault == "kill a pool child":
                    children = pool_children(server.popen.pid)
                    if children:
                        kills[children[0]] = time.time()
                        os.kill(children[0], signal.SIGKILL)
                elif fault == "fill the disk":
                    filler = fill(work)
                    time.sleep(3.0)  # outcomes and claims fail meanwhile
                    filler.unlink()
                else:
                    locker = sqlite3.connect(work / "conveyor.db", isolation_level=None)
                    locker.execute("BEGIN IMMEDIATE")
                    time.sleep(BUSY_TIMEOUT_S + 1.0)
                    locker.execute("COMMIT")
                    locker.close()
                injected[fault] += 1
                started = time.monotonic()
                finals = deployment.finals(client, list(accepted))
                settle_s.append(time.monotonic() - started)
                assert_outcomes(finals, accepted, cancelled, log, kills)
                wait_until(lambda: client.get("/health").status_code == 200, 10, "health")
                statuses.update(task["status"] for task in finals.values())
                attempts.update(task["attempts"] for task in finals.values())
                rounds += 1
        with sqlite3.connect(work / "conveyor.db") as db:
            (rows,) = db.execute("SELECT count(*) FROM tasks").fetchone()
        overlap = most_at_once(runs(log, kills)["fault.thread"])
    finally:
        deployment.close()
    total = sum(statuses.values())
    print(f"\nsoak: {rounds} rounds in {minutes:g} min, {total} tasks, {rows} rows stored")
    print(f"  faults injected: {dict(injected)}")
    print(f"  outcomes: {dict(statuses)}")
    print(f"  attempts per task: {dict(sorted(attempts.items()))}")
    print(f"  most fault.thread bodies at once: {overlap} (limit {THREAD_LIMIT})")
    if settle_s:
        print(
            f"  from the fault to every task ended: median {statistics.median(settle_s):.1f} s, "
            f"longest {max(settle_s):.1f} s"
        )
    assert rows == total, "every task stored once"


if __name__ == "__main__":
    main()
