"""The fault suite: a mixed workload (async, thread and process tasks with retries, timeouts,
cancels and a per-type limit) runs while processes are killed and servers restarted; then every
accepted task has ended, none was recorded twice, the per-type limit held at every moment, and
every process that should be alive still serves."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from .support.faults import (
    SETTLE_S,
    Deployment,
    assert_outcomes,
    cancel_delayed,
    fill,
    pool_children,
    small_disk_at,
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB file system of its own for the data folder, so the test can fill it."""
    with small_disk_at(tmp_path / "data", "32m") as mount:
        yield mount


def test_embedded_engine_with_a_full_disk(
    tmp_path: Path, small_disk: Path, deployments: list[Deployment]
) -> None:
    """The data folder's disk fills while tasks run: writes are refused with 507 (submissions)
    or left to lease recovery (outcomes), reads still answer, and once there is room again
    every accepted task ends and the service takes writes."""
    deployment = Deployment(small_disk, CONVEYOR_CONCURRENCY="8")
    deployments.append(deployment)
    log = Path(tmp_path / "runs.log")  # the bodies' own log is on another disk
    server = deployment.api()
    worker = deployment.worker("--concurrency", "8")
    with deployment.client() as client:
        accepted = submit_all(client, workload(str(log)))
        cancelled = cancel_delayed(client, accepted)
        wait_until(lambda: log.exists() and log.read_text().count("end") >= 10, 60, "progress")
        filler = fill(small_disk)
        ended = log.read_text().count("end")
        late = {"name": "fault.async", "args": {"log": str(log), "ms": 1}}
        for _ in range(5000):  # until the store's free pages and its log's room are used up
            refused = client.post("/tasks", json=late)
            if refused.status_code != 202:
                break
            accepted[refused.json()["id"]] = late
        assert refused.status_code == 507, refused.text
        assert "no room" in refused.json()["detail"]
        # bodies go on ending while their outcomes cannot be written
        wait_until(lambda: log.read_text().count("end") >= ended + 5, 60, "runs on a full disk")
        some = next(iter(accepted))
        assert client.get(f"/tasks/{some}").status_code == 200, "reads still answer"
        assert client.get("/health").status_code == 200
        filler.unlink()
        after = client.post("/tasks", json=late)
        assert after.status_code == 202, "and the service takes writes again once it can"
        accepted[after.json()["id"]] = late
        finals = deployment.finals(client, list(accepted))
    assert_outcomes(finals, accepted, cancelled, log, {})
    assert server.popen.poll() is None and worker.popen.poll() is None
    with sqlite3.connect(small_disk / "conveyor.db") as db:
        (rows,) = db.execute("SELECT count(*) FROM tasks").fetchone()
    assert rows == len(accepted), "none recorded twice"


@dataclass
class CeleryDeployment:
    deployment: Deployment
    postgres: PostgresServer
    redis: RedisServer
    database_url: str

    def rows(self) -> int:
        return asyncio.run(_count(self.database_url))


@pytest.fixture
def celery(tmp_path: Path, deployments: list[Deployment]) -> Iterator[CeleryDeployment]:
    """A Celery deployment's servers (PostgreSQL, Redis) and its processes' settings."""
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
        yield CeleryDeployment(deployment, postgres, redis, database_url)
        deployment.close()
    finally:
        redis.stop()
        postgres.stop()
        postgres.remove()


def test_celery_engine_under_faults(tmp_path: Path, celery: CeleryDeployment) -> None:
    """The API and a prefork Celery worker while a pool process is killed, PostgreSQL restarts
    and Redis restarts (losing every message it held)."""
    deployment = celery.deployment
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
        celery.postgres.stop()
        celery.postgres.start()
        celery.redis.stop()
        celery.redis.start()
        finals = deployment.finals(client, list(accepted))
        assert client.get("/health").status_code == 200
    assert_outcomes(finals, accepted, cancelled, log, kills)
    assert worker.popen.poll() is None, "the worker lives on"
    assert celery.rows() == len(accepted), "none recorded twice"


def test_celery_engine_with_skewed_clocks(tmp_path: Path, celery: CeleryDeployment) -> None:
    """The API host's clock runs two minutes ahead, one worker's two minutes behind and
    another's five minutes ahead: PostgreSQL's clock decides, so delayed tasks and retries
    run when they are due (the skews are longer than the whole settling time), leases are
    neither cut short nor stretched, and nothing runs twice at once."""
    deployment = celery.deployment
    log = Path(tmp_path / "runs.log")
    deployment.api("--no-workers", clock_skew_s=120)
    behind = deployment.worker("--processes", "2", clock_skew_s=-120)
    ahead = deployment.worker("--processes", "1", clock_skew_s=300)
    jobs = workload(str(log))
    jobs += [{"name": "fault.async", "args": {"log": str(log), "ms": 1}, "delay_s": 2}] * 4
    with deployment.client() as client:
        accepted = submit_all(client, jobs)
        cancelled = cancel_delayed(client, accepted)
        finals = deployment.finals(client, list(accepted))
        assert client.get("/health").status_code == 200
    assert_outcomes(finals, accepted, cancelled, log, {})
    assert behind.popen.poll() is None and ahead.popen.poll() is None
    assert celery.rows() == len(accepted), "none recorded twice"


def test_celery_schedules_fire_once_per_planned_time_with_skewed_clocks(
    tmp_path: Path, celery: CeleryDeployment
) -> None:
    """An every-second schedule on the Celery engine with two workers (three pool processes,
    each firing schedules, no beat): one worker's clock two minutes behind, the other's five
    minutes ahead, the API's two ahead. The database's clock decides, so the first fire is
    the next real second (not two minutes away, nothing fired five minutes early) and every
    planned second runs exactly once: no gap, none twice, none missed."""
    deployment = celery.deployment
    log = tmp_path / "runs.log"
    deployment.api("--no-workers", clock_skew_s=120)
    deployment.worker("--processes", "2", clock_skew_s=-120)
    deployment.worker("--processes", "1", clock_skew_s=300)
    body = {
        "name": "tick",
        "task": "fault.async",
        "args": {"log": str(log), "ms": 1},
        "every_s": 1,
    }
    with deployment.client() as client:
        made = time.time()  # this host's clock is the database's (one machine)
        created = client.post("/schedules", json=body)
        assert created.status_code == 201, created.text
        history = f"/schedules/{created.json()['id']}/fires"

        def fires() -> list[dict[str, object]]:
            return list(client.get(history, params={"limit": 200}).json()["items"])

        wait_until(lambda: len(fires()) >= 8, SETTLE_S, "eight fires")
        paused = client.post(f"/schedules/{created.json()['id']}/pause")
        assert paused.status_code == 200, paused.text
        recorded = fires()
        finals = deployment.finals(client, [str(f["task_id"]) for f in recorded])
    assert {f["outcome"] for f in recorded} == {"fired"}, recorded
    assert {t["status"] for t in finals.values()} == {"completed"}, finals
    planned = sorted(datetime.fromisoformat(str(f["fire_at"])).timestamp() for f in recorded)
    assert made - 1 <= planned[0] <= made + 5, (made, planned[0])
    assert {round(b - a, 6) for a, b in itertools.pairwise(planned)} == {1.0}, planned
    scheduled = asyncio.run(_scheduled_task_ids(celery.database_url))
    assert scheduled == {str(f["task_id"]) for f in recorded}, "one task per fire, no other"


async def _scheduled_task_ids(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id FROM conveyor_tasks WHERE idempotency_key LIKE 'schedule:%'"
        )
        return {row[0] for row in rows}
    finally:
        await conn.close()


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM conveyor_tasks"))
    finally:
        await conn.close()
