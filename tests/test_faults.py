"""The fault suite: a mixed workload (async, thread and process tasks with retries, timeouts,
cancels and a per-type limit) runs while processes are killed and servers restarted; then every
accepted task has ended, none was recorded twice, the per-type limit held at every moment, and
every process that should be alive still serves."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from .support.fault_yard import THREAD_LIMIT
from .support.live import free_port
from .support.services import PostgresServer, RedisServer
from .test_crash import Process

pytestmark = pytest.mark.timeout(400)

APP = "tests.support.fault_yard:yard"
LEASE_S = 2.0
# lease recovery (lease + its interval), a retry's backoff, and the work itself, with room
SETTLE_S = 90.0
BUSY_TIMEOUT_S = 1.0


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
    delayed = {task_id for task_id, job in accepted.items() if job.get("delay_s")}
    for task_id in delayed:
        assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
    return delayed


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


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

    def api(self, *extra: str) -> Process:
        args = ["serve", "--app", APP, "--port", str(self.port), "--no-access-log", *extra]
        return self._start(args, "Uvicorn running on")

    def worker(self, *extra: str) -> Process:
        ready = " ready." if self.env.get("CONVEYOR_ENGINE") == "celery" else "worker running"
        return self._start(["worker", "--app", APP, *extra], ready)

    def _start(self, args: list[str], ready: str) -> Process:
        process = Process(args, self.env, ready)
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


@pytest.fixture
def deployments() -> Iterator[list[Deployment]]:
    made: list[Deployment] = []
    yield made
    for deployment in made:
        deployment.close()


def test_embedded_engine_under_faults(tmp_path: Path, deployments: list[Deployment]) -> None:
    """`conveyor serve` and a `conveyor worker` share the SQLite file while the worker is
    killed, a process-pool child is killed, and another process holds the file's write lock
    for longer than the busy timeout (claims, outcomes and submissions fail meanwhile)."""
    deployment = Deployment(
        tmp_path, CONVEYOR_CONCURRENCY="8", CONVEYOR_SQLITE_BUSY_TIMEOUT_S=str(BUSY_TIMEOUT_S)
    )
    deployments.append(deployment)
    log = Path(tmp_path / "runs.log")
    server = deployment.api()
    worker = deployment.worker("--concurrency", "8")
    kills: dict[int, float] = {}
    with deployment.client() as client:
        accepted = submit_all(client, workload(str(log)))
        cancelled = cancel_delayed(client, accepted)
        wait_until(lambda: log.exists() and log.read_text().count("end") >= 10, 60, "progress")
        kills[worker.popen.pid] = time.time()
        worker.kill()
        children = pool_children(server.popen.pid)
        assert children, "the server's process pool has children"
        kills[children[0]] = time.time()
        os.kill(children[0], signal.SIGKILL)
        answers: list[httpx.Response] = []
        late = {"name": "fault.async", "args": {"log": str(log), "ms": 1}}
        locker = sqlite3.connect(tmp_path / "conveyor.db", isolation_level=None)
        try:  # longer than the busy timeout: every write in the meantime fails
            locker.execute("BEGIN IMMEDIATE")
            submitting = threading.Thread(
                target=lambda: answers.append(client.post("/tasks", json=late))
            )
            submitting.start()
            time.sleep(BUSY_TIMEOUT_S + 1.5)
            locker.execute("COMMIT")
            submitting.join(30)
        finally:
            locker.close()
        assert answers[0].status_code == 503, "a write that cannot be committed is refused"
        after = client.post("/tasks", json=late)
        assert after.status_code == 202, "and the service takes writes again once it can"
        accepted[after.json()["id"]] = late
        worker = deployment.worker("--concurrency", "8")
        finals = deployment.finals(client, list(accepted))
        assert client.get("/health").status_code == 200
    assert_outcomes(finals, accepted, cancelled, log, kills)
    assert server.popen.poll() is None and worker.popen.poll() is None
    with sqlite3.connect(tmp_path / "conveyor.db") as db:
        (rows,) = db.execute("SELECT count(*) FROM tasks").fetchone()
    assert rows == len(accepted), "none recorded twice"


def test_celery_engine_under_faults(tmp_path: Path, deployments: list[Deployment]) -> None:
    """The API and a prefork Celery worker while a pool process is killed, PostgreSQL restarts
    and Redis restarts (losing every message it held)."""
    postgres = PostgresServer().start()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        database_url = postgres.create_database()
        deployment = Deployment(
            tmp_path,
            CONVEYOR_ENGINE="celery",
            CONVEYOR_DATABASE_URL=database_url,
            CONVEYOR_BROKER_URL=redis.url(),
            CONVEYOR_CELERY_QUEUE=f"q-{uuid.uuid4().hex[:10]}",
        )
        deployments.append(deployment)
        log = Path(tmp_path / "runs.log")
        deployment.api("--no-workers")
        worker = deployment.worker("--processes", "2")
        kills: dict[int, float] = {}
        with deployment.client() as client:
            accepted = submit_all(client, workload(str(log)))
            cancelled = cancel_delayed(client, accepted)
            wait_until(lambda: log.exists() and log.read_text().count("end") >= 10, 60, "work")
            pool = pool_children(worker.popen.pid)
            assert pool, "the prefork worker has pool processes"
            kills[pool[0]] = time.time()
            os.kill(pool[0], signal.SIGKILL)
            postgres.stop()
            time.sleep(1.0)
            postgres.start()
            redis.stop()
            time.sleep(0.5)
            redis.start()
            finals = deployment.finals(client, list(accepted))
            assert client.get("/health").status_code == 200
        assert_outcomes(finals, accepted, cancelled, log, kills)
        assert worker.popen.poll() is None, "the worker lives on"
        rows = asyncio.run(_count(database_url))
        assert rows == len(accepted), "none recorded twice"
    finally:
        redis.stop()
        postgres.stop()
        postgres.remove()


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM conveyor_tasks"))
    finally:
        await conn.close()
