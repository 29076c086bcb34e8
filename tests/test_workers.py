"""Worker processes register themselves in the store: ``GET /workers`` and ``conveyor workers``
list the server's own workers and a separate ``conveyor worker`` process, with what they run;
a worker that stops cleanly leaves the list at once; one whose heartbeat is older than the lease
is no longer listed (the store contract shows it)."""

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
from conveyor.engines.local import LocalEngine
from conveyor.status import TaskStatus

from .support import tasks
from .support.live import free_port, listed
from .support.process import serve_with_worker

pytestmark = pytest.mark.timeout(120)


def test_the_server_and_a_worker_process_register(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    server, worker = serve_with_worker(spawn, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        # each process registers before it says it is ready
        found = listed(client)
        ours, theirs = found[server.popen.pid], found[worker.popen.pid]
        assert (ours["concurrency"], theirs["concurrency"]) == (3, 5)
        assert ours["engine"] == theirs["engine"] == "local"
        assert ours["host"] == os.uname().nodename and "demo.sleep" in theirs["task_types"]
        assert ours["last_heartbeat_at"].endswith("Z") and ours["id"] != theirs["id"]

        runner = CliRunner()
        shown = runner.invoke(cli, ["workers", "--url", f"http://127.0.0.1:{port}"])
        assert shown.exit_code == 0 and ours["id"] in shown.output and theirs["id"] in shown.output


@pytest.mark.anyio
async def test_a_stopped_worker_leaves_at_once(make_yard: Callable[..., Conveyor]) -> None:
    async with make_yard() as watcher, make_yard() as worker:
        store = watcher.store.workers()
        ids = {w.id for w in await store.alive(lease_s=watcher.settings.lease_s)}
        assert len(ids) == 2
        await worker.stop()
        remaining = await store.alive(lease_s=watcher.settings.lease_s)
        assert len(remaining) == 1 and remaining[0].id in ids


@pytest.mark.anyio
async def test_a_heartbeat_reports_what_the_worker_runs(yard: Conveyor) -> None:
    handle, _ = await yard.submit("t.gated", {"key": "worker-row"})
    async for record in yard.watch(handle.id):
        if record.status is TaskStatus.RUNNING:
            break
    engine = yard.engine
    assert isinstance(engine, LocalEngine)
    await engine.runner.register()  # what each heartbeat does
    (me,) = await yard.store.workers().alive(lease_s=yard.settings.lease_s)
    assert me.running == 1 and "t.gated" in me.task_types
    tasks.ASYNC_GATES["worker-row"].set()
    await yard.wait(handle.id, timeout_s=10)
    await engine.runner.register()
    (me,) = await yard.store.workers().alive(lease_s=yard.settings.lease_s)
    assert me.running == 0
