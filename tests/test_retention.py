"""Retention: finished tasks are deleted with their blobs and log lines once older than
``CONVEYOR_RESULT_TTL``, by the workers' periodic purge or by ``conveyor purge``; queued and
running tasks are never touched, and counts (the tasks', a batch's) stay right."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from conveyor import Conveyor, Settings
from conveyor.cli import app as cli
from conveyor.errors import TaskNotFound
from conveyor.rates import parse_duration
from conveyor.status import TaskStatus
from conveyor.tasklogs import LogLine

pytestmark = pytest.mark.timeout(60)


async def finished_workload(yard: Conveyor) -> dict[str, list[str]]:
    """Three completed (a batch), two failed, one cancelled and one queued for later."""
    batch = await yard.batch("t.echo", [{"value": i} for i in range(3)])
    failed = [(await yard.submit("t.boom", {"message": "no"}))[0].id for _ in range(2)]
    later = (await yard.submit("t.echo", {"value": 0}, delay_s=3600))[0].id
    cancelled = (await yard.submit("t.echo", {"value": 0}, delay_s=3600))[0].id
    await yard.cancel(cancelled)
    completed = [task.id for task in await yard.batches.items(batch.id)]
    for task_id in completed + failed:
        await yard.wait(task_id, timeout_s=20)
    for task_id in failed:  # a blob folder and log lines, to be deleted with the task
        (yard.blobs.root / task_id).mkdir(parents=True, exist_ok=True)
        await yard.store.logs().append(task_id, [LogLine(time.time(), "INFO", "x", 1)])
    return {
        "batch": [batch.id],
        "completed": completed,
        "failed": failed,
        "cancelled": [cancelled],
        "queued": [later],
    }


@pytest.mark.anyio
async def test_purge_deletes_finished_tasks_blobs_and_lines(
    make_yard: Callable[..., Conveyor],
) -> None:
    async with make_yard(result_ttl="none") as yard:
        made = await finished_workload(yard)
        assert await yard.retention.purge(3600) == 0, "nothing finished an hour ago"
        assert await yard.retention.purge(0, statuses={TaskStatus.FAILED}) == 2
        for task_id in made["failed"]:
            assert not (yard.blobs.root / task_id).exists()
            assert await yard.store.logs().read(task_id, after=0, limit=10) == []
        counts = await yard.store.count_by_status()
        assert (counts["failed"], counts["completed"], counts["cancelled"]) == (0, 3, 1)

        assert await yard.retention.purge(0, batch=2) == 4, "several small batches"
        counts = await yard.store.count_by_status()
        assert counts == {**counts, "completed": 0, "cancelled": 0, "queued": 1}
        assert (await yard.get(made["queued"][0])).status is TaskStatus.QUEUED
        batch = await yard.batches.get(made["batch"][0])
        assert batch.counts["completed"] == 0 and batch.total == 3
        with pytest.raises(ValueError, match="only finished"):
            await yard.retention.purge(0, statuses={TaskStatus.QUEUED})


@pytest.mark.anyio
async def test_the_workers_purge_what_outlived_the_ttl(make_yard: Callable[..., Conveyor]) -> None:
    async with make_yard(result_ttl="none") as keeper:
        handle, _ = await keeper.submit("t.echo", {"value": 1})
        await keeper.wait(handle.id, timeout_s=10)
        assert keeper.retention.deleted == 0 and not keeper.retention.passed.is_set()
    async with make_yard(result_ttl="0.001s") as yard:  # its first pass runs as it starts
        with anyio.fail_after(20):
            await yard.retention.passed.wait()
        assert yard.retention.deleted == 1
        assert (await yard.store.count_by_status())["completed"] == 0
        with pytest.raises(TaskNotFound):
            await yard.get(handle.id)


def test_conveyor_purge(make_yard: Callable[..., Conveyor], tmp_path: Path) -> None:
    async def prepare() -> dict[str, list[str]]:
        async with make_yard(result_ttl="none") as yard:
            return await finished_workload(yard)

    made = anyio.run(prepare)
    runner = CliRunner()
    env = {"CONVEYOR_DATA_DIR": str(tmp_path), "CONVEYOR_RESULT_TTL": "none"}
    done = runner.invoke(cli, ["purge", "--older-than", "0.001s", "--status", "failed"], env=env)
    assert done.exit_code == 0, done.output
    assert "deleted 2 tasks" in done.output
    everything = runner.invoke(cli, ["purge", "--older-than", "1s"], env=env)
    assert everything.exit_code == 0 and "deleted" in everything.output
    bad = runner.invoke(cli, ["purge", "--older-than", "soon"], env=env)
    assert bad.exit_code == 2 and "7d, 12h" in bad.output
    queued = runner.invoke(cli, ["purge", "--older-than", "1s", "--status", "queued"], env=env)
    assert queued.exit_code == 2 and "only finished" in queued.output
    assert len(made["queued"]) == 1


def test_result_ttl_is_checked() -> None:
    assert parse_duration("7d") == 7 * 86400 and parse_duration("none") is None
    assert parse_duration("90") == 90 and parse_duration("1.5h") == 5400
    assert Settings(result_ttl="12h").result_ttl_s == 43200
    with pytest.raises(ValidationError, match="result_ttl"):
        Settings(result_ttl="a week")
