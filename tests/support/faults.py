"""The fault suite's workload and what it checks afterwards, shared by tests/test_faults.py and
benchmarks/soak.py: processes of a deployment started on loopback, a mixed workload submitted
over HTTP, and the invariants read back from the store and the bodies' own log."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from .fault_yard import THREAD_LIMIT
from .live import free_port
from .process import Process

APP = "tests.support.fault_yard:yard"
LEASE_S = 2.0
# lease recovery (lease + its interval), a retry's backoff, and the work itself, with room
SETTLE_S = 90.0


def workload(log: str) -> list[dict[str, Any]]:
    """What the suite submits: each type several times, some delayed (to be cancelled)."""
    jobs: list[dict[str, Any]] = []
    for i in range(12):
        jobs.append({"name": "fault.async", "args": {"log": log, "ms": 400 + 50 * i}})
        jobs.append({"name": "fault.thread", "args": {"log": log, "ms": 300}})
        jobs.append({"name": "fault.process", "args": {"log": log, "ms": 300}})
    for _ in range(4):
        jobs.append({"name": "fault.flaky", "args": {"log": log}})
        jobs.append({"name": "fault.too_slow", "args": {"log": log}})
        jobs.append({"name": "fault.async", "args": {"log": log, "ms": 1}, "delay_s": 3600})
    return jobs


def submit_all(client: httpx.Client, jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    accepted = {}
    for job in jobs:
        response = client.post("/tasks", json=job)
        assert response.status_code == 202, response.text
        accepted[response.json()["id"]] = job
    return accepted


def cancel_delayed(client: httpx.Client, accepted: dict[str, dict[str, Any]]) -> set[str]:
    """Cancel the tasks delayed by an hour (they are still waiting): the set of their ids."""
    delayed = {task_id for task_id, job in accepted.items() if job.get("delay_s", 0) >= 3600}
    for task_id in delayed:
        assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
    return delayed


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def small_disk_at(mount: Path, size: str) -> Iterator[Path]:
    """A file system of its own (a tmpfs of ``size``) at ``mount``, for filling; needs root."""
    mount.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise RuntimeError(f"the disk-full fault mounts a tmpfs, which needs root: {made.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to its last byte; the filler file is returned."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def pool_children(parent: int) -> list[int]:
    """Child processes of ``parent`` (process-pool children, prefork pool processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def runs(log: Path, kills: dict[int, float]) -> dict[str, list[tuple[float, float]]]:
    """Each body's interval per task type, from the log; a body whose process was killed ends
    at the kill."""
    started: dict[tuple[str, str, int], tuple[str, float]] = {}
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        event, name, task_id, attempt, pid, at = line.split()
        key = (task_id, attempt, pid)
        if event == "start":
            started[key] = (name, float(at))
        elif key in started:
            name, begun = started.pop(key)
            intervals[name].append((begun, float(at)))
    for (_, _, pid), (name, begun) in started.items():
        end = kills.get(int(pid), float("inf"))  # still running: it never ended
        intervals[name].append((begun, end))
    return intervals


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def assert_outcomes(
    finals: dict[str, dict[str, Any]],
    accepted: dict[str, dict[str, Any]],
    cancelled: set[str],
    log: Path,
    kills: dict[int, float],
) -> None:
    assert set(finals) == set(accepted), "every accepted task is in the store, once"
    for task_id, task in finals.items():
        name = accepted[task_id]["name"]
        if task_id in cancelled:
            assert task["status"] == "cancelled", task
        elif name == "fault.too_slow":  # or its outcome was lost with the store: recovered
            assert task["status"] == "failed", task
            assert task["error"]["type"] in ("TimeoutError", "WorkerLost"), task
        else:
            assert task["status"] == "completed", (task["status"], task["error"], task["attempts"])
            assert task["attempts"] <= task["max_attempts"]
        if name == "fault.flaky":
            assert task["attempts"] >= 2, "the first attempt failed and was retried"
    intervals = runs(log, kills)
    assert most_at_once(intervals["fault.thread"]) <= THREAD_LIMIT, "the per-type limit held"
    ended_ids = {line.split()[2] for line in log.read_text().splitlines() if line[:3] == "end"}
    completed = {i for i, t in finals.items() if t["status"] == "completed"}
    assert completed <= ended_ids, "a completed task's body ran to its end"


class Deployment:
    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.env = {
            **os.environ,
            "CONVEYOR_DATA_DIR": str(tmp_path),
            "CONVEYOR_LEASE_S": str(LEASE_S),
            "CONVEYOR_POLL_S": "0.05",
            "CONVEYOR_SWEEP_S": "0.1",
            "CONVEYOR_REPUBLISH_AFTER_S": "3",
            "CONVEYOR_PROCESS_WORKERS": "2",
            "CONVEYOR_LOG_LEVEL": "info",
            "PYTHONPATH": os.pathsep.join(sys.path),
            **env,
        }
        self.port = free_port()
        self.processes: list[Process] = []

    def api(self, *extra: str, clock_skew_s: float = 0.0) -> Process:
        """The HTTP API (with its workers unless ``--no-workers``), its clock maybe skewed."""
        args = ["serve", "--app", APP, "--port", str(self.port), "--no-access-log", *extra]
        return self._start(args, "Uvicorn running on", clock_skew_s)

    def worker(self, *extra: str, clock_skew_s: float = 0.0) -> Process:
        """A worker; with ``clock_skew_s``, its wall clock is that far ahead (or behind)."""
        ready = " ready." if self.env.get("CONVEYOR_ENGINE") == "celery" else "worker running"
        return self._start(["worker", "--app", APP, *extra], ready, clock_skew_s)

    def _start(self, args: list[str], ready: str, clock_skew_s: float = 0.0) -> Process:
        if not clock_skew_s:
            process = Process(args, self.env, ready)
        else:
            env = {**self.env, "CONVEYOR_TEST_CLOCK_SKEW_S": str(clock_skew_s)}
            process = Process(args, env, ready, module="tests.support.skewed_clock")
        self.processes.append(process)
        return process

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def finals(self, client: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
        terminal = {"completed", "failed", "cancelled"}

        def ended() -> bool:
            statuses = {client.get(f"/tasks/{task_id}").json()["status"] for task_id in ids}
            return statuses <= terminal

        try:
            wait_until(ended, SETTLE_S, "every task to end")
        except AssertionError:
            stuck = [client.get(f"/tasks/{i}").json() for i in ids]
            stuck = [t for t in stuck if t["status"] not in terminal]
            raise AssertionError(f"{len(stuck)} tasks never ended: {stuck[:3]}") from None
        return {task_id: client.get(f"/tasks/{task_id}").json() for task_id in ids}

    def close(self) -> None:
        for process in self.processes:
            process.kill()
