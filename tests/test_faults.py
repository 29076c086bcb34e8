"""The fault suite: a mixed workload (async, thread and process tasks with retries, timeouts,
cancels and a per-type limit) runs while processes are killed and servers restarted; then every
accepted task has ended, none was recorded twice, the per-type limit held at every moment, and
every process that should be alive still serves."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from .support.faults import (
    Deployment,
    assert_outcomes,
    cancel_delayed,
    pool_children,
    submit_all,
    wait_until,
    workload,
)
from .support.services import PostgresServer, RedisServer

pytestmark = pytest.mark.timeout(400)

BUSY_TIMEOUT_S = 1.0


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
            submitting.join(30)  # answered once the write has waited out the busy timeout
            locker.execute("COMMIT")
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
            postgres.start()
            redis.stop()
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
