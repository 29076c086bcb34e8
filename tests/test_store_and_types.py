"""The SQLite store under contention and durability settings; task type definitions."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest
from pydantic import BaseModel

from conveyor import Conveyor, Settings, TaskContext, TaskStatus
from conveyor.errors import ConfigurationError, TaskTypeError

pytestmark = pytest.mark.anyio


class Node(BaseModel):
    value: int
    children: list[Node] = []


async def test_writes_wait_while_another_process_holds_the_lock(
    make_yard: Callable[..., Conveyor],
) -> None:
    async with make_yard() as yard:
        other = sqlite3.connect(yard.settings.sqlite_path(), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # as a `conveyor worker` mid-transaction would
        submitted: list[str] = []

        async def submit() -> None:
            record, _ = await yard.submit("t.echo", {"value": "after the lock"})
            submitted.append(record.id)

        async with anyio.create_task_group() as group:
            group.start_soon(submit)
            await anyio.wait_all_tasks_blocked()
            assert submitted == []  # not answered while the file is locked: nothing committed yet
            other.execute("COMMIT")
        other.close()
        done = await yard.wait(submitted[0], timeout_s=10)
        assert done.result == "after the lock"


async def test_a_batch_given_up_while_its_items_are_made_leaves_the_store_writing(
    make_yard: Callable[..., Conveyor],
) -> None:
    """A batch's rows go in on the writer thread while another thread makes its items: a
    submission cancelled in the middle (a client gone) commits none of them, and the writer
    is free for the next write."""
    made_some, go_on = threading.Event(), threading.Event()

    def items() -> Iterator[dict[str, object]]:
        for i in range(10_000):
            if i == 5_000:  # past the first chunk, which is being written
                made_some.set()
                go_on.wait(30)
            yield {"value": i}

    async with make_yard(run_workers=False) as yard:
        async with anyio.create_task_group() as group:
            group.start_soon(yard.batches.submit, "t.echo", items())
            await anyio.to_thread.run_sync(made_some.wait, 30)
            group.cancel_scope.cancel()
        go_on.set()
        assert await yard.batches.list_batches() == []
        record, _ = await yard.submit("t.echo", {"value": "next"})
        assert (await yard.get(record.id)).status is TaskStatus.QUEUED
        assert (await yard.store.count_by_status())["queued"] == 1
        batch = await yard.batch("t.echo", [{"value": i} for i in range(10)])
        assert (await yard.batches.get(batch.id)).counts["queued"] == 10


@pytest.mark.parametrize("synchronous", ["FULL", "OFF"])
async def test_every_durability_mode_runs_tasks(
    make_yard: Callable[..., Conveyor], synchronous: str
) -> None:
    async with make_yard(sqlite_synchronous=synchronous) as yard:
        records = [(await yard.submit("t.echo", {"value": i}))[0] for i in range(20)]
        results = [(await yard.wait(r.id, timeout_s=10)).result for r in records]
    assert results == list(range(20))


async def test_records_survive_a_restart(make_yard: Callable[..., Conveyor]) -> None:
    async with make_yard(run_workers=False) as first:
        queued, _ = await first.submit("t.echo", {"value": "later"})
    async with make_yard() as second:
        done = await second.wait(queued.id, timeout_s=10)
    assert done.status is TaskStatus.COMPLETED and done.result == "later"


async def test_a_started_instance_refuses_to_start_again(
    make_yard: Callable[..., Conveyor],
) -> None:
    async with make_yard(run_workers=False) as yard:
        with pytest.raises(ConfigurationError):
            await yard.start()


async def test_progress_outside_0_to_100_is_refused() -> None:
    ctx = TaskContext(task_id="x", name="n", attempt=1, max_attempts=1, reporter=lambda p, m: None)
    for bad in (-1, 100.5, float("nan"), "50"):
        with pytest.raises(ValueError):
            ctx.progress(bad)  # type: ignore[arg-type]
    await ctx.progress(100, "done")


def test_task_definitions_that_cannot_work_are_refused(tmp_path: object) -> None:
    yard = Conveyor(Settings())

    async def ok(ctx: TaskContext, x: int) -> int:
        return x

    yard.task(name="a")(ok)
    with pytest.raises(TaskTypeError, match="already registered"):
        yard.task(name="a")(ok)

    def star(ctx: TaskContext, *values: int) -> None: ...

    with pytest.raises(TaskTypeError, match="named parameter"):
        yard.task(name="b")(star)

    def local_sync(x: int) -> int:
        return x

    with pytest.raises(TaskTypeError, match="module-level"):
        yard.task(name="c", executor="process")(local_sync)
    with pytest.raises(TaskTypeError, match="async def"):
        yard.task(name="d", executor="async")(local_sync)
    with pytest.raises(TaskTypeError):
        yard.task(retries=-1)
    with pytest.raises(TaskTypeError):
        yard.task(concurrency=0)


def test_task_without_context_and_default_names() -> None:
    yard = Conveyor(Settings())

    def add(a: int, b: int = 2) -> int:
        return a + b

    task = yard.task()(add)
    assert task.name.endswith("add") and not task.takes_context
    assert task.options.executor == "thread"
    assert task.bind(1) == {"a": 1, "b": 2}


def test_submit_schema_lists_each_task_type_with_inlined_arguments(
    make_yard: Callable[..., Conveyor],
) -> None:
    from fastapi import FastAPI

    yard = make_yard()

    async def tree(ctx: TaskContext, root: Node) -> int:
        return root.value

    yard.task(name="t.tree")(tree)
    app = FastAPI()
    app.include_router(yard.router())
    body = app.openapi()["paths"]["/tasks"]["post"]["requestBody"]
    variants = {v["title"]: v for v in body["content"]["application/json"]["schema"]["oneOf"]}
    assert set(variants) == set(yard.task_types)
    assert variants["t.sync_add"]["required"] == ["name", "args"]
    assert variants["t.echo"]["properties"]["name"] == {"const": "t.echo"}
    point = variants["t.model"]["properties"]["args"]["properties"]["point"]
    assert point["properties"]["x"]["type"] == "integer" and "$ref" not in str(point)
    root = variants["t.tree"]["properties"]["args"]["properties"]["root"]
    assert root["properties"]["children"]["items"] == {}  # the cycle is cut, not followed
