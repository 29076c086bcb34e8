"""The store contract, run unchanged on every implementation (SQLite and PostgreSQL).

Each test drives a store directly, as an engine and the API do: the state rules, the claim token
that guards every write ending an attempt, leases and their recovery.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from conveyor.errors import QueueFull, TaskNotFound, TaskStateConflict
from conveyor.ids import uuid7
from conveyor.record import TaskRecord, WorkerRecord
from conveyor.schedule_record import idempotency_key
from conveyor.status import TaskStatus
from conveyor.store import Store
from conveyor.store.postgres import PostgresStore
from conveyor.store.rows import TaskFilter
from conveyor.store.sqlite import SQLiteStore
from conveyor.tasklogs import MAX_LINES, LogLine

pytestmark = pytest.mark.anyio

WORKER = "host:1:aaaa"
OTHER = "host:2:bbbb"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "tasks.db")
    else:
        opened = PostgresStore(request.getfixturevalue("postgres").create_database())
    await opened.open()
    yield opened
    await opened.close()


async def add(
    store: Store,
    name: str = "t.echo",
    *,
    owner: str = "",
    priority: int = 0,
    delay_s: float = 0.0,
    max_attempts: int = 1,
    key: str | None = None,
    max_queued: int | None = None,
) -> TaskRecord:
    now = time.time()
    record = TaskRecord(
        id=uuid7(),
        name=name,
        status=TaskStatus.QUEUED,
        args={"value": 1},
        owner=owner,
        priority=priority,
        max_attempts=max_attempts,
        created_at=now,
        run_at=now + delay_s,
        idempotency_key=key,
    )
    stored, _ = await store.insert(record, args_json='{"value":1}', max_queued=max_queued)
    return stored


async def claim(
    store: Store,
    n: int = 1,
    *,
    worker: str = WORKER,
    names: tuple[str, ...] = ("t.echo", "t.other"),
    limits: dict[str, int] | None = None,
    lease_s: float = 30.0,
) -> list[TaskRecord]:
    return await store.claim(
        worker_id=worker, names=names, limits=limits or {}, n=n, lease_s=lease_s
    )


async def recover_until(store: Store, expected: set[str]) -> dict[str, TaskRecord]:
    """Run lease recovery until it has recovered ``expected`` (their leases run out soon)."""
    recovered: dict[str, TaskRecord] = {}
    with anyio.fail_after(10):
        while not expected <= set(recovered):
            recovered |= {r.id: r for r in await store.recover_expired()}
            await anyio.sleep(0.01)  # the next look at the leases, not a wait for an outcome
    return recovered


async def test_claim_takes_due_tasks_best_priority_first_under_a_lease(store: Store) -> None:
    low = await add(store, priority=0)
    high = await add(store, priority=5)
    await add(store, delay_s=3600)
    first = await claim(store, 2)
    assert [r.id for r in first] == [high.id, low.id]
    for record in first:
        assert record.status is TaskStatus.RUNNING and record.attempts == 1
        assert record.worker_id == WORKER
        assert record.lease_expires_at is not None and record.lease_expires_at > time.time()
    assert await claim(store, 5) == [], "a delayed task is not due"
    counts = await store.count_by_status()
    assert counts["running"] == 2 and counts["queued"] == 1


async def test_claim_keeps_a_per_type_limit_across_workers(store: Store) -> None:
    for _ in range(3):
        await add(store, "t.other")
    await add(store, "t.echo")
    limits = {"t.other": 1}
    mine = await claim(store, 4, limits=limits)
    assert sorted(r.name for r in mine) == ["t.echo", "t.other"]
    assert await claim(store, 4, worker=OTHER, limits=limits) == [], "t.other is at its limit"


async def test_an_outcome_is_recorded_only_under_the_claim_token(store: Store) -> None:
    await add(store)
    (running,) = await claim(store)
    stale = [(OTHER, running.attempts), (WORKER, running.attempts + 1)]
    for worker, attempt in stale:
        assert not await store.finish(
            running.id, worker, attempt, status=TaskStatus.COMPLETED, result_json="1"
        )
    assert (await store.get(running.id)).status is TaskStatus.RUNNING
    assert await store.finish(
        running.id, WORKER, running.attempts, status=TaskStatus.COMPLETED, result_json='"ok"'
    )
    done = await store.get(running.id)
    assert done.status is TaskStatus.COMPLETED and done.result == "ok" and done.progress == 100
    assert done.finished_at is not None
    assert not await store.finish(
        running.id, WORKER, running.attempts, status=TaskStatus.FAILED, error={"type": "X"}
    ), "a terminal task never changes again"


async def test_progress_is_written_only_by_the_holder(store: Store) -> None:
    await add(store)
    (running,) = await claim(store)
    assert not await store.set_progress(running.id, OTHER, 1, 50.0, "not mine")
    assert await store.set_progress(running.id, WORKER, 1, 40.0, "mine")
    current = await store.get(running.id)
    assert (current.progress, current.message) == (40.0, "mine")


async def test_requeue_puts_a_held_task_back_for_a_retry_or_a_drain(store: Store) -> None:
    await add(store, max_attempts=3)
    (running,) = await claim(store)
    error = {"type": "ValueError", "message": "again", "traceback": None}
    stale = await store.requeue(running.id, OTHER, 1, delay_s=0, error=error, refund_attempt=False)
    assert stale is None
    retried = await store.requeue(
        running.id, WORKER, 1, delay_s=0, error=error, refund_attempt=False
    )
    assert retried is not None and retried.status is TaskStatus.QUEUED
    assert retried.attempts == 1 and retried.error == error and retried.worker_id is None
    (again,) = await claim(store)
    assert again.attempts == 2
    drained = await store.requeue(again.id, WORKER, 2, delay_s=0, error=None, refund_attempt=True)
    assert drained is not None and drained.attempts == 1, "a drain refunds the attempt"
    (third,) = await claim(store)
    later = await store.requeue(third.id, WORKER, 2, delay_s=60, error=None, refund_attempt=False)
    assert later is not None and later.run_at >= time.time() + 50
    assert await claim(store) == [], "a retry waits for its delay"


@pytest.mark.parametrize("refund_attempt", [False, True], ids=["retry", "drain"])
async def test_a_cancel_request_wins_over_a_retry_or_a_drain(
    store: Store, refund_attempt: bool
) -> None:
    await add(store, max_attempts=3)
    (running,) = await claim(store)
    await store.cancel(running.id, owner=None)
    error = {"type": "ConnectionError", "message": "again", "traceback": None}
    ended = await store.requeue(
        running.id, WORKER, 1, delay_s=0, error=error, refund_attempt=refund_attempt
    )
    assert ended is not None and ended.status is TaskStatus.CANCELLED
    assert ended.finished_at is not None and ended.error is None
    assert await claim(store) == []
    assert (await store.count_by_status())["queued"] == 0


async def test_heartbeat_renews_leases_and_reports_cancel_requests(store: Store) -> None:
    await add(store)
    await add(store)
    first, second = await claim(store, 2, lease_s=5.0)
    assert await store.heartbeat(WORKER, [first.id, second.id], 60.0) == []
    renewed = await store.get(first.id)
    assert renewed.lease_expires_at is not None
    assert first.lease_expires_at is not None
    assert renewed.lease_expires_at > first.lease_expires_at + 30
    requested = await store.cancel(second.id, owner=None)
    assert requested.status is TaskStatus.RUNNING and requested.cancel_requested
    assert await store.heartbeat(WORKER, [first.id, second.id], 60.0) == [second.id]
    assert await store.heartbeat(OTHER, [first.id, second.id], 60.0) == []


async def test_heartbeat_renews_only_what_the_worker_still_runs(store: Store) -> None:
    await add(store)
    await add(store)
    held, let_go = await claim(store, 2, lease_s=0.05)
    assert await store.heartbeat(WORKER, [held.id], 60.0) == []
    recovered = await recover_until(store, {let_go.id})
    assert list(recovered) == [let_go.id], "a task its runner let go of expires"
    assert (await store.get(held.id)).status is TaskStatus.RUNNING


async def test_recovery_requeues_fails_or_cancels_what_an_expired_lease_held(
    store: Store,
) -> None:
    retryable = await add(store, "t.echo", max_attempts=2)
    last = await add(store, "t.other", max_attempts=1)
    await claim(store, 2, lease_s=0.05)
    cancelled = await add(store, "t.echo", max_attempts=2)
    await claim(store, lease_s=0.05)
    await store.cancel(cancelled.id, owner=None)
    recovered = await recover_until(store, {retryable.id, last.id, cancelled.id})
    assert set(recovered) == {retryable.id, last.id, cancelled.id}
    assert recovered[retryable.id].status is TaskStatus.QUEUED
    assert recovered[retryable.id].error is not None
    assert recovered[retryable.id].error["type"] == "WorkerLost"
    assert recovered[last.id].status is TaskStatus.FAILED
    assert recovered[last.id].error == recovered[retryable.id].error
    assert recovered[cancelled.id].status is TaskStatus.CANCELLED
    assert await store.recover_expired() == [], "each lost task is recovered once"
    (again,) = await claim(store)
    assert again.id == retryable.id and again.attempts == 2


async def test_cancel_follows_the_state_rules(store: Store) -> None:
    queued = await add(store)
    cancelled = await store.cancel(queued.id, owner=None)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.finished_at is not None
    with pytest.raises(TaskStateConflict, match="already cancelled; it cannot be cancelled"):
        await store.cancel(queued.id, owner=None)
    assert (await store.count_by_status())["queued"] == 0


async def test_retry_and_delete_follow_the_state_rules(store: Store) -> None:
    await add(store)
    (running,) = await claim(store)
    with pytest.raises(TaskStateConflict, match="only failed or cancelled tasks can be retried"):
        await store.retry(running.id, owner=None, attempts=2)
    with pytest.raises(TaskStateConflict, match="cancel it or wait until it ends"):
        await store.delete(running.id, owner=None)
    error = {"type": "ValueError", "message": "no", "traceback": None}
    assert await store.finish(running.id, WORKER, 1, status=TaskStatus.FAILED, error=error)
    retried = await store.retry(running.id, owner=None, attempts=2)
    assert retried.status is TaskStatus.QUEUED and retried.error is None
    assert retried.max_attempts == retried.attempts + 2
    (again,) = await claim(store)
    assert again.attempts == 2
    assert await store.finish(again.id, WORKER, 2, status=TaskStatus.COMPLETED, result_json="1")
    await store.delete(again.id, owner=None)
    with pytest.raises(TaskNotFound):
        await store.get(again.id)


async def test_idempotency_keys_and_tenants(store: Store) -> None:
    first = await add(store, owner="alpha", key="order-17")
    record = TaskRecord(
        id=uuid7(),
        name="t.echo",
        status=TaskStatus.QUEUED,
        args={},
        owner="alpha",
        created_at=time.time(),
        run_at=time.time(),
        idempotency_key="order-17",
    )
    same, created = await store.insert(record, args_json="{}", max_queued=None)
    assert not created and same.id == first.id
    other = await add(store, owner="beta", key="order-17")
    assert other.id != first.id, "keys are per tenant"
    with pytest.raises(TaskNotFound):
        await store.get(first.id, owner="beta")
    with pytest.raises(TaskNotFound):
        await store.cancel(first.id, owner="beta")
    assert [r.id for r in await store.list_tasks(owner="beta")] == [other.id]


async def test_a_full_queue_refuses_new_tasks(store: Store) -> None:
    await add(store, max_queued=2)
    await add(store, max_queued=2)
    with pytest.raises(QueueFull):
        await add(store, max_queued=2)


async def test_listing_is_newest_first_with_a_cursor(store: Store) -> None:
    ids = [(await add(store, "t.echo" if i % 2 else "t.other")).id for i in range(5)]
    page = await store.list_tasks(owner=None, limit=2)
    assert [r.id for r in page] == ids[::-1][:2]
    rest = await store.list_tasks(owner=None, limit=10, before_seq=page[-1].seq)
    assert [r.id for r in rest] == ids[::-1][2:]
    echoes = await store.list_tasks(owner=None, name="t.echo", status=TaskStatus.QUEUED)
    assert [r.id for r in echoes] == [ids[3], ids[1]]


async def test_listing_narrowed_to_a_time_range_an_id_prefix_a_batch_or_a_schedule(
    store: Store,
) -> None:
    """Tasks submitted at known times: a time range (found by submission order) lists exactly
    those inside it, newest first, with the cursor; an id prefix lists the tasks whose id
    starts with it; a batch lists its own tasks, and a schedule the tasks its fires made."""
    made: list[TaskRecord] = []
    for i in range(12):
        record = TaskRecord(
            id=f"0{i:07x}-0000-7000-8000-{i:012x}",
            name="t.echo",
            status=TaskStatus.QUEUED,
            args={"value": 1},
            created_at=1000.0 + i,
            run_at=1000.0 + i,
            batch_id="b-1" if i % 3 == 0 else None,
            idempotency_key=idempotency_key("s-1", 60.0 * i) if i % 4 == 1 else None,
        )
        made.append((await store.insert(record, args_json='{"value":1}', max_queued=None))[0])
    stamped = {r.id: 1000.0 + i for i, r in enumerate(made)}
    if isinstance(store, PostgresStore):  # the database's clock stamps a new task: set them
        async with store.connection() as conn:
            await conn.executemany(
                "UPDATE conveyor_tasks SET created_at = $2 WHERE id = $1", list(stamped.items())
            )

    window = TaskFilter(created_after=1003.0, created_before=1009.0)
    inside = await store.list_tasks(owner=None, narrowed=window)
    assert [r.id for r in inside] == [r.id for r in reversed(made[3:9])]
    first = await store.list_tasks(owner=None, narrowed=window, limit=4)
    rest = await store.list_tasks(owner=None, narrowed=window, limit=4, before_seq=first[-1].seq)
    assert [r.id for r in first + rest] == [r.id for r in inside], "the cursor within it"
    later = await store.list_tasks(owner=None, narrowed=TaskFilter(created_after=1010.5))
    assert [r.id for r in later] == [made[11].id]
    assert await store.list_tasks(owner=None, narrowed=TaskFilter(created_after=2000)) == []
    earlier = await store.list_tasks(owner=None, narrowed=TaskFilter(created_before=1001.0))
    assert [r.id for r in earlier] == [made[0].id]

    prefixed = await store.list_tasks(owner=None, narrowed=TaskFilter(id_prefix="0000000a"))
    assert [r.id for r in prefixed] == [made[10].id]
    assert await store.list_tasks(owner=None, narrowed=TaskFilter(id_prefix="ffffffff")) == []
    batch = await store.list_tasks(owner=None, narrowed=TaskFilter(batch_id="b-1"))
    assert [r.id for r in batch] == [made[9].id, made[6].id, made[3].id, made[0].id]
    mixed = TaskFilter(batch_id="b-1", created_after=1004.0)
    assert [r.id for r in await store.list_tasks(owner=None, narrowed=mixed)] == [
        made[9].id,
        made[6].id,
    ]
    scheduled = await store.list_tasks(owner="", narrowed=TaskFilter(schedule_id="s-1"))
    assert [r.id for r in scheduled] == [made[9].id, made[5].id, made[1].id]
    assert all(r.schedule_id == "s-1" for r in scheduled)
    assert await store.list_tasks(owner="", narrowed=TaskFilter(schedule_id="s-")) == []


async def test_many_tasks_are_committed_together_or_not_at_all(store: Store) -> None:
    await add(store)
    now = time.time()
    records = [
        TaskRecord(
            id=uuid7(),
            name="t.echo",
            status=TaskStatus.QUEUED,
            args={"value": i},
            created_at=now,
            run_at=now,
        )
        for i in range(3)
    ]
    args = [f'{{"value":{i}}}' for i in range(3)]
    with pytest.raises(QueueFull):
        await store.insert_many(records, args_json=args, max_queued=3)
    assert (await store.count_by_status())["queued"] == 1, "none of the three was committed"
    stored = await store.insert_many(records, args_json=args, max_queued=4)
    assert [r.id for r in stored] == [r.id for r in records]
    assert all(r.seq for r in stored) and len({r.seq for r in stored}) == 3
    assert [(await store.get(r.id)).args for r in records] == [{"value": i} for i in range(3)]
    assert len(await claim(store, 10)) == 4


async def test_counts_follow_every_kind_of_write(store: Store) -> None:
    """/health's counts (and the queued count behind 429) agree with the tasks themselves after
    every kind of write: submit, claim, finish, retry back to the queue, lease recovery,
    cancel, retry by hand, delete, for several owners and types."""

    async def counted(owner: str | None) -> dict[str, int]:
        tasks = await store.list_tasks(owner=owner, limit=1000)
        expected = {status.value: 0 for status in TaskStatus}
        for task in tasks:
            expected[task.status.value] += 1
        return expected

    for owner in ("", "acme", "globex"):
        for name in ("t.echo", "t.other"):
            await add(store, name, owner=owner, max_attempts=2)
    first, second, third, fourth = await claim(store, 4)
    assert await store.finish(first.id, WORKER, 1, status=TaskStatus.COMPLETED, result_json="1")
    assert await store.finish(second.id, WORKER, 1, status=TaskStatus.FAILED, error={"x": 1})
    requeued = await store.requeue(third.id, WORKER, 1, delay_s=0, error=None, refund_attempt=False)
    assert requeued is not None and requeued.status is TaskStatus.QUEUED
    await store.cancel(fourth.id, owner=None)  # running: requested, ended by the heartbeat's holder
    assert await store.finish(fourth.id, WORKER, 1, status=TaskStatus.CANCELLED)
    lost = await claim(store, 2, lease_s=0.05)
    await recover_until(store, {task.id for task in lost})
    queued = await store.list_tasks(owner=None, status=TaskStatus.QUEUED, limit=1000)
    await store.cancel(queued[0].id, owner=None)
    await store.retry(second.id, owner=None, attempts=1)
    await store.delete(first.id, owner=None)
    many = [
        TaskRecord(
            id=uuid7(),
            name="t.echo",
            status=TaskStatus.QUEUED,
            args={},
            owner="acme",
            created_at=time.time(),
            run_at=time.time(),
        )
        for _ in range(3)
    ]
    await store.insert_many(many, args_json=["{}"] * 3, max_queued=None)
    for owner in (None, "", "acme", "globex", "nobody"):
        assert await store.count_by_status(owner=owner) == await counted(owner), owner
    totals = await store.count_by_status()
    assert totals["queued"] > 0 and totals["completed"] == 0 and totals["cancelled"] == 2
    with pytest.raises(QueueFull):
        await add(store, max_queued=totals["queued"])
    await add(store, max_queued=totals["queued"] + 1)


async def test_stats_count_by_type_and_status_and_age_the_oldest_queued(store: Store) -> None:
    empty = await store.stats().snapshot()
    assert empty.counts == {} or set(empty.counts.values()) == {0}
    assert empty.oldest_queued_age_s is None
    await add(store, "t.echo")
    await add(store, "t.echo", delay_s=3600)
    await add(store, "t.other")
    await claim(store, 1, names=("t.other",))
    snapshot = await store.stats().snapshot()
    assert snapshot.counts[("t.echo", "queued")] == 2
    assert snapshot.counts[("t.other", "running")] == 1
    assert snapshot.oldest_queued_age_s is not None and 0 <= snapshot.oldest_queued_age_s < 60


async def test_workers_register_renew_and_leave(store: Store) -> None:
    workers = store.workers()
    me = WorkerRecord(
        id=WORKER,
        host="host",
        pid=1,
        engine="local",
        concurrency=4,
        task_types=["t.echo"],
        started_at=time.time(),
    )
    await workers.beat(me, lease_s=30)
    me.running = 3
    await workers.beat(me, lease_s=30)
    (found,) = await workers.alive(lease_s=30)
    assert (found.id, found.running, found.task_types) == (WORKER, 3, ["t.echo"])
    assert found.last_heartbeat_at is not None and abs(found.last_heartbeat_at - time.time()) < 60
    assert await workers.alive(lease_s=0) == [], "a heartbeat older than the lease: not listed"
    await workers.gone(WORKER)
    assert await workers.alive(lease_s=30) == []


async def test_a_task_keeps_its_last_log_lines(store: Store) -> None:
    task = await add(store)
    lines = [LogLine(time.time(), "INFO", f"line {i}", 1) for i in range(MAX_LINES + 5)]
    await store.logs().append(task.id, lines[:10])
    await store.logs().append(task.id, lines[10:])
    kept = await store.logs().read(task.id, after=0, limit=MAX_LINES + 10)
    assert [line.message for _, line in kept] == [f"line {i}" for i in range(5, MAX_LINES + 5)]
    page = await store.logs().read(task.id, after=kept[1][0], limit=2)
    assert [line.message for _, line in page] == ["line 7", "line 8"]
    await store.logs().delete(task.id)
    assert await store.logs().read(task.id, after=0, limit=10) == []


async def test_purge_deletes_expired_finished_tasks_in_batches(store: Store) -> None:
    done = [await add(store) for _ in range(3)]
    waiting = await add(store, delay_s=3600)
    for record in await claim(store, 3):
        await store.finish(record.id, WORKER, 1, status=TaskStatus.COMPLETED, result_json="1")
    await store.logs().append(done[0].id, [LogLine(time.time(), "INFO", "x", 1)])
    purge = store.retention().purge
    assert await purge("completed", finished_before=time.time() - 3600, limit=10) == []
    first = await purge("completed", finished_before=time.time() + 1, limit=2)
    rest = await purge("completed", finished_before=time.time() + 1, limit=2)
    assert len(first) == 2 and len(rest) == 1
    assert set(first + rest) == {record.id for record in done}
    assert await store.logs().read(done[0].id, after=0, limit=10) == []
    counts = await store.count_by_status()
    assert counts["completed"] == 0 and counts["queued"] == 1
    assert (await store.get(waiting.id)).status is TaskStatus.QUEUED
