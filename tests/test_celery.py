"""The Celery engine under faults: real `conveyor serve` and `conveyor worker` (prefork) processes,
real Redis and PostgreSQL servers, killed and restarted mid-batch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from conveyor import Conveyor, Settings, TaskRecord, TaskStatus
from conveyor.service import create_app

from .support import worker_yard
from .support.live import LiveServer, follow, free_port, most_in_any_window
from .support.process import Process
from .support.services import PostgresServer, RedisServer

pytestmark = pytest.mark.timeout(300)

SLEEP = {"seconds": 0.05, "steps": 1}


class Deployment:
    """One API and any number of Celery workers, as separate processes sharing one store."""

    def __init__(self, tmp_path: Path, database_url: str, broker_url: str) -> None:
        self.database_url = database_url
        self.env = {
            **os.environ,
            "CONVEYOR_ENGINE": "celery",
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_BROKER_URL": broker_url,
            "CONVEYOR_CELERY_QUEUE": f"q-{uuid.uuid4().hex[:10]}",
            "CONVEYOR_DATA_DIR": str(tmp_path),
            "CONVEYOR_LEASE_S": "2",
            "CONVEYOR_SWEEP_S": "0.1",
            "CONVEYOR_REPUBLISH_AFTER_S": "3",
            "CONVEYOR_LOG_LEVEL": "info",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        self.processes: list[Process] = []
        self.port = free_port()

    def api(self) -> Process:
        args = ["serve", "--no-workers", "--port", str(self.port), "--no-access-log"]
        return self._start(args, ready="Uvicorn running on")

    def worker(self, processes: int = 2, app: str | None = None) -> Process:
        args = ["worker", "--pool", "prefork", "--processes", str(processes)]
        return self._start([*args, "--app", app] if app else args, ready=" ready.")

    def celery_worker(self, *args: str) -> Process:
        """Celery's own `celery -A conveyor.celery_app worker` command."""
        return self._start(
            ["-A", "conveyor.celery_app", "worker", *args], ready=" ready.", module="celery"
        )

    def celery(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`celery -A conveyor.celery_app <args>` (inspect, ...), run to its end."""
        command = [sys.executable, "-m", "celery", "-A", "conveyor.celery_app", *args]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def _start(self, args: list[str], ready: str, module: str = "conveyor") -> Process:
        process = Process(args, self.env, ready, module=module)
        self.processes.append(process)
        return process

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def client_yard(self) -> Conveyor:
        """A Conveyor on this deployment's store and broker that runs no tasks, with the task
        types of ``tests.support.worker_yard`` (whose workers run them)."""
        settings = Settings(
            engine="celery",
            database_url=self.database_url,
            broker_url=self.env["CONVEYOR_BROKER_URL"],
            celery_queue=self.env["CONVEYOR_CELERY_QUEUE"],
            data_dir=self.env["CONVEYOR_DATA_DIR"],
        )
        client = Conveyor(settings, run_workers=False)
        worker_yard.register(client)
        return client

    def rows(self) -> list[tuple[str, str, int, str]]:
        async def fetch() -> list[tuple[str, str, int, str]]:
            conn = await asyncpg.connect(self.database_url)
            try:
                rows = await conn.fetch(
                    "SELECT id, status, attempts, worker_id FROM conveyor_tasks"
                )
            finally:
                await conn.close()
            return [tuple(row) for row in rows]  # type: ignore[misc]

        return asyncio.run(fetch())

    def close(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.fixture
def deploy(tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer) -> Iterator[Any]:
    deployments: list[Deployment] = []

    def make(broker_url: str | None = None) -> Deployment:
        deployment = Deployment(
            tmp_path, postgres.create_database(), broker_url or redis_server.url()
        )
        deployments.append(deployment)
        return deployment

    yield make
    for deployment in deployments:
        deployment.close()


def submit(client: httpx.Client, n: int, args: dict[str, Any] = SLEEP) -> list[str]:
    ids = []
    for _ in range(n):
        response = client.post("/tasks", json={"name": "demo.sleep", "args": args})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[1])  # host:pid:nonce


def first_running(
    deployment: Deployment, where: Callable[[str], bool] = lambda worker_id: True
) -> tuple[str, str, int, str]:
    """The first task seen running (in a worker that ``where`` accepts), read from the store
    until one is, for at most a minute (a slow machine starts the worker slowly)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for row in deployment.rows():
            if row[1] == "running" and where(row[3]):
                return row
    raise AssertionError("no task ran")


def wait_until_running_in(deployment: Deployment, worker: Process) -> None:
    """Until a task runs in one of ``worker``'s pool processes (its process group)."""
    first_running(deployment, lambda worker_id: os.getpgid(pid_of(worker_id)) == worker.popen.pid)


def assert_all_completed_once(deployment: Deployment, client: httpx.Client, ids: list[str]) -> None:
    finals = [follow(client, task_id)[0] for task_id in ids]
    assert [t["status"] for t in finals] == ["completed"] * len(ids)
    rows = deployment.rows()
    assert len(rows) == len(ids) and {row[0] for row in rows} == set(ids)  # none lost or doubled
    assert all(row[1] == "completed" for row in rows)


def test_kill_9_a_worker_mid_batch(deploy: Any) -> None:
    deployment = deploy()
    deployment.api()
    doomed = deployment.worker()
    deployment.worker()
    with deployment.client() as client:
        ids = submit(client, 500)
        follow(client, ids[100])  # well into the batch
        wait_until_running_in(deployment, doomed)
        doomed.kill()  # the whole process group: the worker and its pool processes
        assert_all_completed_once(deployment, client, ids)
    rows = deployment.rows()
    assert {row[2] for row in rows} <= {1, 2}
    assert any(row[2] == 2 for row in rows), "the killed worker's tasks were recovered and re-run"
    pool_processes = {row[3].rpartition(":")[0] for row in rows}
    assert len(pool_processes) >= 3, "pool processes of both workers ran tasks"


def test_a_worker_stopped_mid_batch_records_what_it_ran(deploy: Any) -> None:
    """SIGTERM (warm shutdown): the tasks it ran are recorded before its processes exit, so none
    is left running under its lease, and none is run twice."""
    deployment = deploy()
    deployment.api()
    stopped = deployment.worker()
    with deployment.client() as client:
        ids = submit(client, 300, {"seconds": 0.01, "steps": 1})
        follow(client, ids[50])
        wait_until_running_in(deployment, stopped)
        os.kill(stopped.popen.pid, signal.SIGTERM)
        assert stopped.popen.wait(60) == 0
        stopped_ids = {row[0] for row in deployment.rows() if row[3]}
        assert {row[1] for row in deployment.rows() if row[0] in stopped_ids} <= {"completed"}
        deployment.worker()
        assert_all_completed_once(deployment, client, ids)
    rows = deployment.rows()
    assert {row[2] for row in rows} == {1}, "nothing the stopped worker ran was run again"


def test_a_concurrency_limit_holds_across_workers(deploy: Any) -> None:
    """Two workers (four pool processes) never run more than the type's limit (2) at once,
    as the store saw it: no instant lies in more than two [started_at, finished_at] spans."""
    deployment = deploy()
    for _ in range(2):
        deployment.worker(processes=2, app="tests.support.worker_yard:yard")

    async def submit_and_wait() -> None:
        async with deployment.client_yard() as client:
            handles = [await client.submit("limited.sleep", {"seconds": 0.2}) for _ in range(12)]
            for record, _ in handles:
                assert (await client.wait(record.id, timeout_s=60)).status.value == "completed"

    asyncio.run(submit_and_wait())

    async def spans() -> list[tuple[float, float]]:
        conn = await asyncpg.connect(deployment.database_url)
        try:
            rows = await conn.fetch("SELECT started_at, finished_at FROM conveyor_tasks")
        finally:
            await conn.close()
        return [(row[0], row[1]) for row in rows]

    recorded = asyncio.run(spans())
    assert len(recorded) == 12
    # an end sorts before a start at the same instant
    edges = sorted([(start, 1) for start, _ in recorded] + [(end, -1) for _, end in recorded])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2, f"{peak} tasks of a type limited to 2 ran at once"


def test_a_rate_holds_across_three_pool_processes(deploy: Any) -> None:
    deployment = deploy()
    worker = deployment.worker(processes=3, app="tests.support.worker_yard:yard")

    async def submit_and_wait() -> list[TaskRecord]:
        async with deployment.client_yard() as client:
            # each task holds its pool process 0.25 s: one process starts 4 a second at most
            batch = await client.batch("rated.pid_after", [{"seconds": 0.25}] * 36)
            async for seen in client.batches.watch(batch.id, interval_s=0.05):
                last = seen
            assert last.counts["completed"] == 36, last.counts
            return await client.batches.items(batch.id)

    items = asyncio.run(asyncio.wait_for(submit_and_wait(), 120))
    starts = [t.started_at for t in items if t.started_at is not None]
    assert len(starts) == 36
    assert most_in_any_window(starts, 1.0) <= 10
    assert len({t.result for t in items}) >= 2, "several pool processes shared the rate"
    assert worker.popen.poll() is None


def test_cancel_reaches_a_task_running_in_a_pool_process(deploy: Any) -> None:
    """The API and the worker are separate processes, and workers do not LISTEN: the request
    reaches the pool process through its heartbeat, which stops the task."""
    deployment = deploy()
    deployment.api()
    worker = deployment.worker(processes=1)
    with deployment.client() as client:
        [task_id] = submit(client, 1, {"seconds": 120, "steps": 120})
        wait_until_running_in(deployment, worker)
        assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
        task, _ = follow(client, task_id)  # 120 s and "completed" if the request were missed
    assert task["status"] == "cancelled" and task["result"] is None
    [(_id, status, attempts, _worker)] = deployment.rows()
    assert status == "cancelled" and attempts == 1


def test_kill_9_one_prefork_child(deploy: Any) -> None:
    deployment = deploy()
    deployment.api()
    worker = deployment.worker()
    with deployment.client() as client:
        ids = submit(client, 20, {"seconds": 1.0, "steps": 10})
        victim = first_running(deployment)  # it names its pool process
        child_pid = pid_of(victim[3])
        assert child_pid != worker.popen.pid
        os.kill(child_pid, signal.SIGKILL)
        finals = [follow(client, task_id)[0] for task_id in ids]
    assert [t["status"] for t in finals] == ["completed"] * len(ids)
    killed = next(t for t in finals if t["id"] == victim[0])
    assert killed["attempts"] == 2, "re-run once after its lease expired"
    assert worker.popen.poll() is None, "the worker replaced its pool process and lives on"


def test_a_task_that_kills_its_worker_runs_at_most_max_attempts_times(
    deploy: Any, tmp_path: Path
) -> None:
    """Each run ends its pool process; Celery hands the message back (``acks_late``, rejected on
    a lost worker), and Conveyor's attempt counter ends the loop: two runs (``retries=1``), then
    ``failed: WorkerLost``, and the worker lives on to run the next task."""
    deployment = deploy()
    worker = deployment.worker(processes=1, app="tests.support.worker_yard:yard")
    log = tmp_path / "crash-runs.log"

    async def crash_then_sleep() -> tuple[TaskRecord, TaskRecord]:
        async with deployment.client_yard() as client:
            crashed, _ = await client.submit("crash.worker", {"log": str(log)})
            failed = await client.wait(crashed.id, timeout_s=90)
            # queued behind every message the crashes handed back: it runs once they are gone
            after, _ = await client.submit("limited.sleep", {"seconds": 0})
            return failed, await client.wait(after.id, timeout_s=60)

    failed, after = asyncio.run(crash_then_sleep())
    assert failed.status is TaskStatus.FAILED and failed.attempts == failed.max_attempts == 2
    assert failed.error is not None and failed.error["type"] == "WorkerLost"
    runs = log.read_text().split()
    assert len(runs) == 2 and len(set(runs)) == 2, f"runs in pool processes {runs}"
    assert after.status is TaskStatus.COMPLETED
    assert log.read_text().split() == runs, "a handed-back message ran the failed task again"
    assert worker.popen.poll() is None, "the worker replaced its pool process each time"


def test_restart_redis_mid_batch(deploy: Any, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "own-redis").start()
    try:
        deployment = deploy(redis.url())
        deployment.api()
        deployment.worker()
        with deployment.client() as client:
            ids = submit(client, 200)
            follow(client, ids[20])
            redis.stop()  # every queued message is lost with it (no persistence)
            more = submit(client, 20)  # the API still commits: the store is the truth
            redis.start()
            assert_all_completed_once(deployment, client, ids + more)
    finally:
        redis.stop()


def test_tasks_submitted_while_the_broker_is_down_run_once_it_is_up(
    deploy: Any, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "late-redis")  # its port is chosen, nothing listens yet
    deployment = deploy(redis.url())
    deployment.api()
    try:
        with deployment.client() as client:
            ids = submit(client, 5)  # a 202 means committed in the store, broker or not
            assert {row[1] for row in deployment.rows()} == {"queued"}
            redis.start()
            deployment.worker(processes=1)
            assert_all_completed_once(deployment, client, ids)
    finally:
        redis.stop()


def test_postgres_down_answers_503_and_recovers(
    tmp_path: Path, redis_server: RedisServer, serve: Any
) -> None:
    postgres = PostgresServer().start()
    try:
        settings = Settings(
            engine="celery",
            database_url=postgres.create_database(),
            broker_url=redis_server.url(),
            celery_queue=f"q-{uuid.uuid4().hex[:10]}",
            data_dir=tmp_path,
            lease_s=2.0,
            sweep_s=0.1,
            republish_after_s=3.0,
        )
        server: LiveServer = serve(create_app(settings))
        with server.client() as client:
            before = submit(client, 1)[0]
            assert follow(client, before)[0]["status"] == "completed"
            postgres.stop()
            for _ in range(3):
                refused = client.post("/tasks", json={"name": "demo.echo", "args": {"value": 1}})
                assert refused.status_code == 503, refused.text
                assert "PostgreSQL" in refused.json()["detail"]
            assert client.get(f"/tasks/{before}").status_code == 503
            postgres.start()
            after = submit(client, 3)
            for task_id in after:
                assert follow(client, task_id)[0]["status"] == "completed"
            assert client.get(f"/tasks/{before}").json()["status"] == "completed"
    finally:
        postgres.stop()
        postgres.remove()


def test_celery_own_tools_see_the_workers(deploy: Any) -> None:
    deployment = deploy()
    deployment.worker(processes=1)
    inspect = deployment.celery("inspect", "registered")
    assert "1 node online" in inspect.stdout
    for name in ("demo.echo", "demo.sleep", "images.transform"):
        assert name in inspect.stdout


def test_celery_own_worker_command_runs_the_tasks(deploy: Any) -> None:
    """`celery -A conveyor.celery_app worker`, Celery's own command with its default pool, runs
    the tasks in the prefork pool processes that `celery inspect stats` lists."""
    deployment = deploy()
    deployment.api()
    deployment.celery_worker("--concurrency=2", "--loglevel=INFO")
    (node,) = json.loads(deployment.celery("inspect", "stats", "-j").stdout).values()
    assert node["pool"]["implementation"] == "celery.concurrency.prefork:TaskPool"
    pool = set(node["pool"]["processes"])
    assert len(pool) == 2
    with deployment.client() as client:
        ids = submit(client, 20)
        assert_all_completed_once(deployment, client, ids)
    assert {pid_of(row[3]) for row in deployment.rows()} <= pool


def test_flower_sees_the_workers_and_their_task_types(deploy: Any) -> None:
    deployment = deploy()
    worker = deployment.worker(processes=1)
    port = free_port()
    flower = Process(
        ["-A", "conveyor.celery_app", "flower", f"--port={port}", "--address=127.0.0.1"],
        {**deployment.env, "FLOWER_UNAUTHENTICATED_API": "true"},
        ready="Visit me at",
        module="celery",
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            workers = client.get("/api/workers", params={"refresh": "true"})
            assert workers.status_code == 200, workers.text
            (name, info), *others = workers.json().items()
            assert not others and name.startswith("celery@")
            assert {"demo.echo", "demo.sleep", "images.transform"} <= set(info["registered"])
            assert info["stats"]["pool"]["max-concurrency"] == 1  # --processes 1
    finally:
        flower.kill()
        worker.kill()


def test_a_task_that_calls_sys_exit_fails_and_its_pool_process_goes_on(deploy: Any) -> None:
    deployment = deploy()
    deployment.worker(processes=1, app="tests.support.worker_yard:yard")

    async def exit_then_run() -> tuple[TaskRecord, TaskRecord, TaskRecord]:
        async with deployment.client_yard() as client:
            before, _ = await client.submit("pid", {})
            before = await client.wait(before.id, timeout_s=60)
            exited, _ = await client.submit("exit.worker", {"code": 2})
            exited = await client.wait(exited.id, timeout_s=60)
            after, _ = await client.submit("pid", {})
            return before, exited, await client.wait(after.id, timeout_s=60)

    before, exited, after = asyncio.run(exit_then_run())
    assert exited.status is TaskStatus.FAILED and exited.attempts == 1
    assert exited.error is not None and exited.error["type"] == "SystemExit"
    assert after.status is TaskStatus.COMPLETED
    assert after.result == before.result, "the same pool process ran the next task"


def test_a_process_task_runs_in_a_prefork_pool_process(deploy: Any) -> None:
    """A pool process is daemonic, and multiprocessing refuses children to daemons: the runtime
    lifts that for its own children, so `executor="process"` types (the image service's) run."""
    deployment = deploy()
    deployment.api()
    deployment.worker(processes=1)
    with deployment.client() as client:
        task = client.post("/tasks", json={"name": "demo.cpu", "args": {"n": 100_000}}).json()
        done = follow(client, task["id"])[0]
    assert done["status"] == "completed", done["error"]
    assert done["result"] == 9592
