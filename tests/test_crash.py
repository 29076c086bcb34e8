"""Crash tests: `kill -9` of the server or of a worker process mid-run loses nothing."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support.live import follow, free_port
from .support.process import start_server

pytestmark = pytest.mark.timeout(300)

TASKS = 200
SLEEP_ARGS = {"seconds": 0.3, "steps": 3}


def follow_to_end(client: httpx.Client, task_id: str) -> dict[str, Any]:
    return follow(client, task_id)[0]


def submit_batch(client: httpx.Client) -> list[str]:
    ids = []
    for _ in range(TASKS):
        response = client.post("/tasks", json={"name": "demo.sleep", "args": SLEEP_ARGS})
        assert response.status_code == 202
        ids.append(response.json()["id"])
    return ids


def stored_rows(tmp_path: Path) -> list[tuple[str, str, int, str]]:
    with sqlite3.connect(tmp_path / "conveyor.db") as db:
        return db.execute("SELECT id, status, attempts, worker_id FROM tasks").fetchall()


def assert_all_completed_once(client: httpx.Client, ids: list[str], tmp_path: Path) -> None:
    finals = [follow_to_end(client, task_id) for task_id in ids]
    assert [t["status"] for t in finals] == ["completed"] * TASKS
    assert all(t["result"] == {"slept": 0.3} for t in finals)
    rows = stored_rows(tmp_path)
    assert len(rows) == TASKS and {row[0] for row in rows} == set(ids)  # none lost, none doubled
    attempts = [t["attempts"] for t in finals]
    assert set(attempts) <= {1, 2}
    assert 2 in attempts, "the killed run's tasks should have been recovered and re-run"
    recovered = next(t for t in finals if t["attempts"] == 2)
    lines = client.get(f"/tasks/{recovered['id']}/logs").json()["items"]
    lost = [(x["attempt"], x["level"]) for x in lines if x["message"].startswith("attempt 1 ")]
    assert lost == [(2, "WARNING")], "the attempts' history is kept with the task's lines"
    assert any(x["message"] == "attempt 1 was lost with its worker" for x in lines)


def test_kill_9_server_mid_run(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(spawn, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        ids = submit_batch(client)
        follow_to_end(client, ids[40])  # well into the batch: some done, 16 running
        server.kill()
    port = free_port()
    start_server(spawn, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        assert_all_completed_once(client, ids, tmp_path)


def test_kill_9_worker_while_server_lives(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    start_server(spawn, port, CONVEYOR_CONCURRENCY="2")
    worker = spawn(
        "worker", "--concurrency", "16", ready="worker running", CONVEYOR_LOG_LEVEL="info"
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        ids = submit_batch(client)
        follow_to_end(client, ids[60])
        worker.kill()
        assert_all_completed_once(client, ids, tmp_path)
    workers = {row[3] for row in stored_rows(tmp_path)}
    assert len(workers) == 2, "both the worker process and the server ran tasks"


def test_sigterm_stops_the_server_while_a_client_follows_events(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(spawn, port, CONVEYOR_SHUTDOWN_GRACE_S="1")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        task = client.post("/tasks", json={"name": "demo.sleep", "args": {"seconds": 120}}).json()
        with client.stream("GET", f"/tasks/{task['id']}/events") as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("event:")  # the stream is open
            server.popen.send_signal(signal.SIGTERM)
            # uvicorn ends by re-raising the signal it handled: a clean stop reads as SIGTERM
            assert server.popen.wait(30) in (0, -signal.SIGTERM), "".join(server.lines[-20:])
    assert any("Application shutdown complete" in line for line in server.lines)
    (row,) = stored_rows(tmp_path)
    assert row[1] == "queued", "the drained task waits for the next start"
