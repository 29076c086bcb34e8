"""Rate limits per task type: at most N starts in any window of the period, across every worker
sharing the store (on both engines, and with three worker processes); a task held back by its
rate stays queued and says why."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from conveyor import Conveyor, Settings, TaskStatus
from conveyor.errors import TaskTypeError
from conveyor.rates import Rate, parse_rate

from .support import worker_yard
from .support.live import most_in_any_window
from .support.process import Process

pytestmark = pytest.mark.anyio


def test_the_window_counter_counts() -> None:
    assert most_in_any_window([0.0, 0.5, 0.99, 1.0, 1.2], 1.0) == 4  # [0.5, 1.5)
    assert most_in_any_window([0.0, 1.0, 2.0], 1.0) == 1
    assert most_in_any_window([], 1.0) == 0


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("20/s", Rate(20, 1.0)),
        ("100/m", Rate(100, 60.0)),
        ("1000/h", Rate(1000, 3600.0)),
        (" 5 / 10s ", Rate(5, 10.0)),
        ("3/minute", Rate(3, 60.0)),
        ("7/hours", Rate(7, 3600.0)),
    ],
)
def test_rates_are_parsed(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(str(rate)) == rate


@pytest.mark.parametrize("text", ["", "20", "20/d", "0/s", "-1/s", "1.5/s", "20/0s", "x/s"])
def test_bad_rates_are_refused_at_registration(text: str) -> None:
    yard = Conveyor(Settings(data_dir=Path("unused")), run_workers=False)
    with pytest.raises(TaskTypeError, match="rate"):
        yard.task(name="bad", rate=text)(worker_yard.pid)


async def test_starts_stay_under_the_rate(yard: Conveyor) -> None:
    batch = await yard.batch("t.rated", [{"value": i} for i in range(25)])
    with anyio.fail_after(30):
        async for seen in yard.batches.watch(batch.id, interval_s=0.05):
            last = seen
    assert last.counts["completed"] == 25
    starts = [t.started_at for t in await yard.batches.items(batch.id) if t.started_at]
    assert len(starts) == 25
    assert most_in_any_window(starts, 1.0) <= 10
    assert max(starts) - min(starts) >= 2.0, "25 starts at 10/s take two whole periods"
    assert yard.task_types["t.rated"].options.as_json()["rate"] == "10/s"


async def test_a_task_held_by_its_rate_says_so(yard: Conveyor) -> None:
    handles = [await yard.submit("t.rated_hourly", {"value": i}) for i in range(3)]
    for record, _ in handles[:2]:
        assert (await yard.wait(record.id, timeout_s=10)).status is TaskStatus.COMPLETED
    held = await yard.get(handles[2][0].id)
    assert held.status is TaskStatus.QUEUED
    assert held.message == "waiting for the rate limit of 2/h"
    other = await yard.submit("t.echo", {"value": 1})
    assert (await yard.wait(other[0].id, timeout_s=10)).status is TaskStatus.COMPLETED, (
        "other types are not held back"
    )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Process]]:
    """Three `conveyor worker` processes on one SQLite file, each running two tasks at most (the
    Celery engine's prefork processes are tested in test_celery)."""
    env = {
        **os.environ,
        "CONVEYOR_DATA_DIR": str(tmp_path),
        "CONVEYOR_POLL_S": "0.02",
        "CONVEYOR_LOG_LEVEL": "info",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    app = ["worker", "--app", "tests.support.worker_yard:yard", "--concurrency", "2"]
    started = [Process(app, env, "worker running") for _ in range(3)]
    yield started
    for process in started:
        process.kill()


async def test_three_worker_processes_share_one_rate(
    workers: list[Process], tmp_path: Path
) -> None:
    client = Conveyor(Settings(data_dir=tmp_path), run_workers=False)
    worker_yard.register(client)
    async with client:
        # each task holds one of its process's two slots for 0.25 s, so one process starts 8 a
        # second at most and the rate's other starts are left to the other processes (with
        # instant tasks, one process could take every window of the rate)
        batch = await client.batch("rated.pid_after", [{"seconds": 0.25}] * 40)
        with anyio.fail_after(60):
            async for seen in client.batches.watch(batch.id, interval_s=0.05):
                last = seen
        assert last.counts["completed"] == 40
        items = await client.batches.items(batch.id)
    starts = [t.started_at for t in items if t.started_at]
    assert most_in_any_window(starts, 1.0) <= 10
    pids = {t.result for t in items}
    assert len(pids) >= 2, "the rate was shared by several worker processes"
    assert pids <= {w.popen.pid for w in workers}
