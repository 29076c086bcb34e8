"""A task's own log lines: kept with the task (every attempt, from async code, a thread or a
child process, through ``ctx.log`` or the ``logging`` module) and served by
``GET /tasks/{id}/logs``; every record emitted inside a task carries the task's fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor import Conveyor
from conveyor.service import create_app
from conveyor.tasklogs import install

from .support.live import LiveServer, follow, free_port, service_settings
from .support.process import start_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def lines_of(yard: Conveyor, task_id: str) -> list[tuple[int, str, str]]:
    found = await yard.store.logs().read(task_id, after=0, limit=1000)
    return [(line.attempt, line.level, line.message) for _, line in found]


async def test_sync_and_process_tasks_keep_their_lines_per_attempt(yard: Conveyor) -> None:
    records = Records()
    logging.getLogger().addHandler(records)
    install()  # gives the handler added after the workers started the task fields
    try:
        handle, _ = await yard.submit("t.logs_sync", {"fail_first": True})
        done = await yard.wait(handle.id, timeout_s=30)
        child, _ = await yard.submit("t.logs_process", {})
        child_done = await yard.wait(child.id, timeout_s=30)
    finally:
        logging.getLogger().removeHandler(records)
    assert done.status.value == "completed" and done.attempts == 2
    lines = await lines_of(yard, handle.id)
    assert (1, "WARNING", "library line on attempt 1") in lines
    assert (1, "INFO", "ctx line on attempt 1") in lines
    assert (2, "WARNING", "library line on attempt 2") in lines
    assert (2, "INFO", "ctx line on attempt 2") in lines
    assert [a for a, _, _ in lines] == sorted(a for a, _, _ in lines), "in the order logged"

    assert child_done.status.value == "completed"
    child_lines = await lines_of(yard, child.id)
    assert (1, "WARNING", f"child line from {child_done.result}") in child_lines
    assert (1, "INFO", "child ctx line") in child_lines

    library = [r for r in records.records if r.getMessage() == "library line on attempt 2"]
    assert library and library[0].task_id == handle.id  # type: ignore[attr-defined]
    assert library[0].task == "t.logs_sync" and library[0].attempt == 2  # type: ignore[attr-defined]
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "outside", None, None)
    records.handle(outside)
    assert getattr(records.records[-1], "task_id", None) is None


async def test_each_failed_attempt_is_kept_with_its_worker_time_and_error(
    yard: Conveyor,
) -> None:
    """A task that needed several attempts keeps one line per failed attempt among its log
    lines (its number, worker, time and error); one that succeeded at once has none."""
    flaky, _ = await yard.submit("t.flaky", {"key": "history", "failures": 2})
    assert (await yard.wait(flaky.id, timeout_s=30)).status.value == "completed"
    history = [(a, m) for a, level, m in await lines_of(yard, flaky.id) if level == "WARNING"]
    assert [a for a, _ in history] == [1, 2]
    for attempt, message in history:
        assert message.startswith(f"attempt {attempt} of 3 on worker ")
        assert f"(ConnectionError: transient failure {attempt}); the next in" in message
    given_up, _ = await yard.submit("t.flaky", {"key": "never", "failures": 9})
    assert (await yard.wait(given_up.id, timeout_s=30)).status.value == "failed"
    last = [m for a, _, m in await lines_of(yard, given_up.id) if a == 3]
    assert len(last) == 1 and last[0].endswith("; no attempt left")
    once, _ = await yard.submit("t.echo", {"value": 1})
    await yard.wait(once.id, timeout_s=30)
    assert await lines_of(yard, once.id) == []


def test_logs_route_and_tenants(serve: Callable[[FastAPI], LiveServer], tmp_path: Path) -> None:
    settings = service_settings(tmp_path, api_keys="alpha:ka,beta:kb")
    server = serve(create_app(settings))
    alpha = server.client(headers={"authorization": "Bearer ka"})
    beta = server.client(headers={"authorization": "Bearer kb"})
    with alpha, beta:
        task = alpha.post(
            "/tasks", json={"name": "demo.sleep", "args": {"seconds": 0.1, "steps": 3}}
        )
        task_id = task.json()["id"]
        assert follow(alpha, task_id)[0]["status"] == "completed"
        page = alpha.get(f"/tasks/{task_id}/logs").json()
        messages = [item["message"] for item in page["items"]]
        assert messages == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
        first = page["items"][0]
        assert first["level"] == "INFO" and first["attempt"] == 1 and first["at"].endswith("Z")
        assert page["next_cursor"] is None
        two = alpha.get(f"/tasks/{task_id}/logs", params={"limit": 2}).json()
        rest = alpha.get(f"/tasks/{task_id}/logs", params={"cursor": two["next_cursor"]}).json()
        assert [i["message"] for i in two["items"] + rest["items"]] == messages
        assert beta.get(f"/tasks/{task_id}/logs").status_code == 404
        assert alpha.delete(f"/tasks/{task_id}").status_code == 204
        assert alpha.get(f"/tasks/{task_id}/logs").status_code == 404


def test_json_log_lines_carry_the_task(spawn: Any) -> None:
    port = free_port()
    server = start_server(spawn, port, CONVEYOR_LOG_FORMAT="json")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        body = {"name": "demo.sleep", "args": {"seconds": 0.05, "steps": 2}}
        task_id = client.post("/tasks", json=body).json()["id"]
        assert follow(client, task_id)[0]["status"] == "completed"
    server.kill()  # its output is complete once it has ended
    parsed = [json.loads(line) for line in server.lines if line.startswith("{")]
    steps = [entry for entry in parsed if entry["message"] == "step 2 of 2"]
    assert len(steps) == 1, server.lines[-20:]
    step = steps[0]
    assert (step["task_id"], step["task"], step["attempt"]) == (task_id, "demo.sleep", 1)
    assert step["level"] == "INFO" and step["at"].endswith("Z") and step["worker"]
    assert any(entry["task_id"] is None for entry in parsed), "lines outside a task: null"
