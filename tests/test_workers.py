"""Worker processes register themselves in the store: ``GET /workers`` and ``conveyor workers``
list the server's own workers and a separate ``conveyor worker`` process, with what they run;
a worker that stops cleanly leaves the list at once, one killed leaves it after its lease."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from conveyor import Conveyor
from conveyor.cli import app as cli

from .support.live import follow, free_port, listed, wait_until
from .support.process import serve_with_worker

pytestmark = pytest.mark.timeout(120)


def test_workers_register_and_leave(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    server, worker = serve_with_worker(spawn, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        wait_until(lambda: {server.popen.pid, worker.popen.pid} <= set(listed(client)))
        found = listed(client)
        ours, theirs = found[server.popen.pid], found[worker.popen.pid]
        assert (ours["concurrency"], theirs["concurrency"]) == (3, 5)
        assert ours["engine"] == theirs["engine"] == "local"
        assert ours["host"] == os.uname().nodename and "demo.sleep" in theirs["task_types"]
        assert ours["last_heartbeat_at"].endswith("Z") and ours["id"] != theirs["id"]

        task = client.post("/tasks", json={"name": "demo.sleep", "args": {"seconds": 30}}).json()
        wait_until(lambda: sum(w["running"] for w in listed(client).values()) == 1)
        client.post(f"/tasks/{task['id']}/cancel")
        follow(client, task["id"])

        runner = CliRunner()
        shown = runner.invoke(cli, ["workers", "--url", f"http://127.0.0.1:{port}"])
        assert shown.exit_code == 0 and ours["id"] in shown.output and theirs["id"] in shown.output

        worker.kill()  # no chance to say goodbye: gone once its lease runs out
        wait_until(lambda: worker.popen.pid not in listed(client))
        assert server.popen.pid in listed(client)


@pytest.mark.anyio
async def test_a_stopped_worker_leaves_at_once(make_yard: Callable[..., Conveyor]) -> None:
    async with make_yard() as watcher, make_yard() as worker:
        store = watcher.store.workers()
        ids = {w.id for w in await store.alive(lease_s=watcher.settings.lease_s)}
        assert len(ids) == 2
        await worker.stop()
        remaining = await store.alive(lease_s=watcher.settings.lease_s)
        assert len(remaining) == 1 and remaining[0].id in ids
