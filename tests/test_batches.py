"""Batches on both engines: many tasks committed as one, counted, listed by status, cancelled
and retried as one; a bad item or a full queue commits nothing; tenants apart."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import anyio
import pytest

from conveyor import Conveyor, TaskStatus
from conveyor.batch_record import BatchRecord
from conveyor.errors import BatchNotFound, InvalidArguments, QueueFull

from .support import tasks

pytestmark = pytest.mark.anyio


async def finished(yard: Conveyor, batch_id: str, owner: str | None = None) -> BatchRecord:
    """Follow the batch until no item is queued or running; its last state."""
    last = None
    with anyio.fail_after(30):
        async for seen in yard.batches.watch(batch_id, owner=owner, interval_s=0.02):
            last = seen
    assert last is not None and not last.active
    return last


async def test_a_batch_runs_every_item_and_counts_them(yard: Conveyor) -> None:
    batch = await yard.batch("t.echo", [{"value": i} for i in range(40)])
    assert batch.total == 40 and batch.counts["queued"] + batch.counts["completed"] <= 40
    assert batch.to_json()["links"]["items"] == f"/batches/{batch.id}/items"

    done = await finished(yard, batch.id)
    assert done.counts == {"queued": 0, "running": 0, "completed": 40, "failed": 0, "cancelled": 0}
    assert done.progress == 100 and done.finished_at is not None
    assert done.to_json()["status"] == "finished"

    items = await yard.batches.items(batch.id, limit=100)
    assert [item.result for item in items] == list(range(40)), "submission order"
    assert {item.batch_id for item in items} == {batch.id}
    assert items[0].to_json()["links"]["batch"] == f"/batches/{batch.id}"

    first = await yard.batches.items(batch.id, limit=15)
    rest = await yard.batches.items(batch.id, after_seq=first[-1].seq, limit=100)
    assert [i.result for i in first + rest] == list(range(40)), "pages join without a gap"


async def test_typed_batch_from_the_task_type(yard: Conveyor) -> None:
    add = yard.task_types["t.sync_add"]
    batch = await add.batch([{"a": i, "b": 1} for i in range(5)])
    await finished(yard, batch.id)
    items = await yard.batches.items(batch.id)
    assert [item.result for item in items] == [1, 2, 3, 4, 5]


async def test_a_bad_item_commits_nothing(yard: Conveyor) -> None:
    items: list[dict[str, object]] = [{"a": 1, "b": 2}] * 5
    items[3] = {"a": "x", "b": 2}
    with pytest.raises(InvalidArguments) as caught:
        await yard.batch("t.sync_add", items)
    assert ["items", 3, "args", "a"] in [d["loc"] for d in caught.value.details]
    assert await yard.batches.list_batches() == []
    assert (await yard.store.count_by_status())["queued"] == 0


ODD_VALUES: list[object] = [
    "ünïcødé 🚀 日本",
    'quote " backslash \\ newline \n tab \t nul \u0000 bell \u0007',
    2**70,
    -(2**63),
    1.5e300,
    0.1,
    [1, [2, {"k": None}], True],
    {"": "", "a b": {"c": []}},
    None,
]


async def test_a_batch_bigger_than_a_chunk_keeps_every_item_as_given(
    make_yard: Callable[..., Conveyor],
) -> None:
    """A batch is written a chunk of 4,096 items at a time: the items of every chunk are stored
    as they were given, in order, each with its own id."""
    n = 2 * 4096 + 7
    values = [ODD_VALUES[i % len(ODD_VALUES)] if i % 500 == 0 else i for i in range(n)]
    async with make_yard(run_workers=False) as yard:
        batch = await yard.batch("t.echo", [{"value": v} for v in values])
        assert batch.total == n and batch.counts["queued"] == n
        got = await yard.batches.get(batch.id)
        assert got.total == n and got.counts["queued"] == n
        items, after = [], None
        while page := await yard.batches.items(batch.id, after_seq=after, limit=1000):
            items += page
            after = page[-1].seq
        assert [item.args["value"] for item in items] == values
        assert len({item.id for item in items}) == n
        assert [item.seq for item in items] == list(range(items[0].seq, items[0].seq + n))
        assert {(item.status, item.batch_id) for item in items} == {(TaskStatus.QUEUED, batch.id)}
        assert (await yard.store.count_by_status())["queued"] == n


async def test_a_bad_item_past_the_first_chunks_commits_nothing(
    make_yard: Callable[..., Conveyor],
) -> None:
    items: list[dict[str, object]] = [{"a": i, "b": 2} for i in range(9000)]
    items[8500] = {"a": 1}
    async with make_yard(run_workers=False) as yard:
        with pytest.raises(InvalidArguments) as caught:
            await yard.batch("t.sync_add", items)
        assert ["items", 8500, "args", "b"] in [d["loc"] for d in caught.value.details]
        assert await yard.batches.list_batches() == []
        assert (await yard.store.count_by_status())["queued"] == 0
        fine = await yard.batch("t.sync_add", items[:8500])
        assert (await yard.batches.get(fine.id)).counts["queued"] == 8500


async def test_a_batch_that_does_not_fit_commits_nothing(
    make_yard: Callable[..., Conveyor],
) -> None:
    async with make_yard(max_queued=10, run_workers=False) as yard:
        with pytest.raises(QueueFull):
            await yard.batch("t.echo", [{"value": i} for i in range(11)])
        assert await yard.batches.list_batches() == []
        fits = await yard.batch("t.echo", [{"value": i} for i in range(10)])
        assert fits.counts["queued"] == 10


async def test_failed_items_are_listed_and_retried(yard: Conveyor) -> None:
    run = uuid.uuid4().hex[:8]
    items = [{"key": f"{run}-{i}", "failures": 3 if i % 2 else 0} for i in range(8)]
    batch = await yard.batch("t.flaky", items)
    done = await finished(yard, batch.id)
    assert (done.counts["completed"], done.counts["failed"]) == (4, 4)

    failed = await yard.batches.items(batch.id, status=TaskStatus.FAILED)
    assert [item.args["key"] for item in failed] == [f"{run}-{i}" for i in (1, 3, 5, 7)]
    assert all(item.error and item.error["type"] == "ConnectionError" for item in failed)

    retried = await yard.batches.retry(batch.id)
    # the four are queued again; the workers may have run them before the answer is read
    assert retried.counts["failed"] == 0
    assert retried.active + retried.counts["completed"] == 8
    again = await finished(yard, batch.id)
    assert again.counts["completed"] == 8
    assert [i.attempts for i in await yard.batches.items(batch.id, status=TaskStatus.COMPLETED)][
        1::2
    ] == [4, 4, 4, 4], "each retried item ran once more after its three failed attempts"
    with pytest.raises(InvalidArguments):
        await yard.batches.retry(batch.id, statuses=[TaskStatus.COMPLETED])


async def test_cancel_stops_queued_items_and_asks_running_ones(yard: Conveyor) -> None:
    key = f"cancel-{uuid.uuid4().hex[:8]}"
    tasks.ASYNC_GATES[key] = anyio.Event()  # type: ignore[assignment]
    batch = await yard.batch("t.gated_limited", [{"key": key}] * 20)
    with anyio.fail_after(10):
        async for seen in yard.batches.watch(batch.id, interval_s=0.02):
            if seen.counts["running"] == 2:  # the type's limit: the others wait queued
                break
    cancelled = await yard.batches.cancel(batch.id)
    assert cancelled.counts["queued"] == 0 and cancelled.counts["cancelled"] >= 18
    done = await finished(yard, batch.id)
    assert done.counts["cancelled"] == 20, done.counts
    assert done.counts["completed"] == 0


async def test_tenants_see_only_their_batches(yard: Conveyor) -> None:
    mine = await yard.batch("t.echo", [{"value": 1}], owner="acme")
    with pytest.raises(BatchNotFound):
        await yard.batches.get(mine.id, owner="globex")
    with pytest.raises(BatchNotFound):
        await yard.batches.items(mine.id, owner="globex")
    with pytest.raises(BatchNotFound):
        await yard.batches.cancel(mine.id, owner="globex")
    assert [b.id for b in await yard.batches.list_batches(owner="acme")] == [mine.id]
    assert await yard.batches.list_batches(owner="globex") == []


async def test_an_empty_batch_is_finished_at_once(yard: Conveyor) -> None:
    batch = await yard.batch("t.echo", [])
    stored = await yard.batches.get(batch.id)
    assert stored.total == 0 and not stored.active and stored.progress == 100
    assert stored.to_json()["finished_at"] is not None
