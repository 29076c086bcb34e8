"""Wake-ups between processes sharing one SQLite file: `conveyor serve --no-workers` and a
`conveyor worker`. A task submitted to the API process is started by the worker process as soon
as it is committed, and the API process's event stream sees the worker's changes as soon as they
are committed — not at the next poll. Both processes poll only every 10 s here, so a task that
went through in less than that was woken, not polled; and when wake-ups cannot work (their
folder cannot be made), everything still ends, by polling."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support.faults import Deployment
from .support.live import follow

POLL_S = 10.0


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    made = Deployment(tmp_path, CONVEYOR_POLL_S=str(POLL_S))
    yield made
    made.close()


def test_a_worker_process_starts_what_the_api_process_committed_at_once(
    tmp_path: Path, deployment: Deployment
) -> None:
    deployment.api("--no-workers")
    worker = deployment.worker("--concurrency", "4")
    log = str(tmp_path / "runs.log")
    with deployment.client() as client:
        started = time.monotonic()
        for ms in range(10):
            answer = client.post(
                "/tasks", json={"name": "fault.async", "args": {"log": log, "ms": ms}}
            )
            assert answer.status_code == 202, answer.text
            task, events = follow(client, answer.json()["id"])
            assert task["status"] == "completed" and task["result"] == ms
            assert events[-1][1]["status"] == "completed"
        through = time.monotonic() - started
    assert through < POLL_S / 2, (
        f"ten tasks one after another took {through:.1f} s: the processes polled "
        f"(every {POLL_S:g} s) instead of waking each other"
    )
    assert worker.popen.poll() is None
    assert not (tmp_path / "conveyor.db.wake").is_file()


def test_without_wake_ups_the_processes_poll(tmp_path: Path) -> None:
    (tmp_path / "conveyor.db.wake").write_text("not a folder")  # wake-ups cannot start
    deployment = Deployment(tmp_path, CONVEYOR_POLL_S="0.2")
    try:
        server = deployment.api("--no-workers")
        deployment.worker("--concurrency", "4")
        log = str(tmp_path / "runs.log")
        with deployment.client() as client:
            answer = client.post(
                "/tasks", json={"name": "fault.async", "args": {"log": log, "ms": 1}}
            )
            task, _ = follow(client, answer.json()["id"])
        assert task["status"] == "completed"
        assert any("wake-ups are off" in line for line in server.lines), server.lines[-10:]
    finally:
        deployment.close()
