"""The engine contract: every engine must pass this suite unchanged (see conftest.ENGINES)."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from conveyor import Conveyor, TaskFailed, TaskStatus
from conveyor.errors import (
    InvalidArguments,
    QueueFull,
    StoreUnavailable,
    TaskStateConflict,
    UnknownTaskType,
    WaitTimeout,
)

from .support import tasks
from .support.live import wait_for_status

pytestmark = pytest.mark.anyio


async def test_submit_and_result(yard: Conveyor) -> None:
    record, created = await yard.submit("t.echo", {"value": {"a": [1, 2, "x"]}})
    assert created and record.status is TaskStatus.QUEUED
    done = await yard.wait(record.id, timeout_s=10)
    assert done.status is TaskStatus.COMPLETED
    assert done.result == {"a": [1, 2, "x"]}
    assert done.progress == 100
    assert done.attempts == 1
    assert done.started_at is not None and done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at


async def test_typed_submit_from_python(yard: Conveyor) -> None:
    add = yard.task_types["t.sync_add"]
    handle = await add.submit(2, b=40)
    assert await handle.result(timeout_s=10) == 42


async def test_pydantic_arguments_and_results(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.model", {"point": {"x": 1, "y": "2"}})
    assert record.args == {"point": {"x": 1, "y": 2}}
    done = await yard.wait(record.id, timeout_s=10)
    assert done.result == {"x": 2, "y": 1}


async def test_bad_arguments_are_refused_before_storing(yard: Conveyor) -> None:
    with pytest.raises(InvalidArguments) as caught:
        await yard.submit("t.sync_add", {"a": "not a number", "c": 1})
    locations = {tuple(d["loc"]) for d in caught.value.details}
    assert ("args", "a") in locations and ("args", "b") in locations
    assert ("args", "c") in locations
    with pytest.raises(UnknownTaskType):
        await yard.submit("t.nope", {})
    assert await yard.list() == []


async def test_progress_is_persisted_and_streamed(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.gated", {"key": "progress"})
    seen = []
    with anyio.fail_after(10):
        async for current in yard.watch(record.id):
            seen.append((current.status, current.progress, current.message))
            if current.progress == 50:
                stored = await yard.get(record.id)
                assert stored.message == "waiting at the gate"
                tasks.ASYNC_GATES["progress"].set()
    assert (TaskStatus.RUNNING, 50, "waiting at the gate") in seen
    assert seen[-1][0] is TaskStatus.COMPLETED


async def test_failure_records_type_message_and_traceback(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.boom", {"message": "bad input 42"})
    done = await yard.wait(record.id, timeout_s=10)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None
    assert done.error["type"] == "ValueError"
    assert done.error["message"] == "bad input 42"
    assert "in boom" in done.error["traceback"]
    handle = yard.task_types["t.boom"]
    with pytest.raises(TaskFailed, match="bad input 7"):
        await (await handle.submit(message="bad input 7")).result(timeout_s=10)


async def test_unserialisable_result_fails_clearly(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.unserialisable", {})
    done = await yard.wait(record.id, timeout_s=10)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error["type"] == "TypeError"
    assert "JSON-serialisable" in done.error["message"]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("t.gated_short", id="async"),
        pytest.param("t.thread_short", id="thread"),
        pytest.param("t.cpu_short", id="process"),
    ],
)
async def test_timeout_fails_with_timeout_error(yard: Conveyor, name: str) -> None:
    record, _ = await yard.submit(name, {} if name == "t.cpu_short" else {"key": f"to-{name}"})
    done = await yard.wait(record.id, timeout_s=20)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error["type"] == "TimeoutError"
    assert "timed out" in done.error["message"]


async def test_timeout_per_submission_overrides_type(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.gated", {"key": "override"}, timeout_s=0.1)
    done = await yard.wait(record.id, timeout_s=10)
    assert done.error is not None and done.error["type"] == "TimeoutError"


async def test_retry_with_backoff_until_success(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.flaky", {"key": "retry-ok", "failures": 2})
    done = await yard.wait(record.id, timeout_s=20)
    assert done.status is TaskStatus.COMPLETED
    assert done.result == 3 and done.attempts == 3 and done.max_attempts == 3


async def test_retries_exhausted_keep_the_last_error(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.flaky", {"key": "retry-ko", "failures": 5})
    done = await yard.wait(record.id, timeout_s=20)
    assert done.status is TaskStatus.FAILED
    assert done.attempts == 3
    assert done.error is not None and done.error["message"] == "transient failure 3"


async def test_only_retry_on_exceptions_are_retried(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.wrong_kind", {})
    done = await yard.wait(record.id, timeout_s=10)
    assert done.status is TaskStatus.FAILED and done.attempts == 1


async def test_cancel_queued_is_immediate(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.echo", {"value": 1}, delay_s=3600)
    cancelled = await yard.cancel(record.id)
    assert cancelled.status is TaskStatus.CANCELLED
    with pytest.raises(TaskStateConflict):
        await yard.cancel(record.id)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        pytest.param("t.gated", {"key": "cancel-async"}, id="async"),
        pytest.param("t.thread_gated", {"key": "cancel-thread"}, id="thread"),
        pytest.param("t.cpu_forever", {}, id="process"),
    ],
)
async def test_cancel_running(yard: Conveyor, name: str, args: dict[str, str]) -> None:
    record, _ = await yard.submit(name, args)
    with anyio.fail_after(20):
        async for current in yard.watch(record.id):
            if current.status is TaskStatus.RUNNING and current.progress > 0:
                break
    requested = await yard.cancel(record.id)
    assert requested.cancel_requested
    done = await yard.wait(record.id, timeout_s=20)
    assert done.status is TaskStatus.CANCELLED


async def test_process_pool_replaces_a_killed_or_crashed_child(yard: Conveyor) -> None:
    crashed, _ = await yard.submit("t.cpu_crash", {})
    done = await yard.wait(crashed.id, timeout_s=20)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error["type"] == "WorkerLost"
    squares = [(await yard.submit("t.cpu_square", {"n": n}))[0] for n in range(4)]
    results = [(await yard.wait(r.id, timeout_s=20)).result for r in squares]
    assert results == [0, 1, 4, 9]


async def test_per_type_concurrency_limit(yard: Conveyor) -> None:
    ids = [(await yard.submit("t.gated_limited", {"key": "limit"}))[0].id for _ in range(6)]
    await wait_for_status(yard, ids[1], TaskStatus.RUNNING)
    running = await yard.list(status=TaskStatus.RUNNING)
    assert len(running) == 2
    tasks.ASYNC_GATES["limit"].set()
    for task_id in ids:
        assert (await yard.wait(task_id, timeout_s=20)).status is TaskStatus.COMPLETED
    assert tasks.ACTIVE["max"] == 2


async def test_global_concurrency_limit(make_yard: Callable[..., Conveyor]) -> None:
    tasks.ACTIVE.update(now=0, max=0)
    async with make_yard(concurrency=3) as yard:
        ids = [(await yard.submit("t.gated", {"key": "global"}))[0].id for _ in range(7)]
        await wait_for_status(yard, ids[2], TaskStatus.RUNNING)
        assert len(await yard.list(status=TaskStatus.RUNNING)) == 3
        tasks.ASYNC_GATES["global"].set()
        for task_id in ids:
            await yard.wait(task_id, timeout_s=20)
        assert tasks.ACTIVE["max"] == 3
    tasks.ASYNC_GATES.clear()


async def test_priority_orders_the_queue(make_yard: Callable[..., Conveyor]) -> None:
    async with make_yard(run_workers=False) as submitter:
        low = (await submitter.submit("t.echo", {"value": "low"}, priority=0))[0]
        high = (await submitter.submit("t.echo", {"value": "high"}, priority=10))[0]
        mid = (await submitter.submit("t.echo", {"value": "mid"}, priority=5))[0]
    async with make_yard(concurrency=1) as worker:
        done = [await worker.wait(r.id, timeout_s=10) for r in (low, high, mid)]
    by_start = sorted(done, key=lambda r: r.started_at or 0)
    assert [r.result for r in by_start] == ["high", "mid", "low"]


async def test_delay_defers_the_start(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.echo", {"value": 1}, delay_s=0.5)
    assert record.run_at == pytest.approx(record.created_at + 0.5)
    done = await yard.wait(record.id, timeout_s=10)
    assert done.started_at is not None and done.started_at >= record.created_at + 0.5


async def test_idempotency_key_answers_the_same_task(yard: Conveyor) -> None:
    first, created = await yard.submit("t.echo", {"value": 1}, idempotency_key="k-1")
    again, created_again = await yard.submit("t.echo", {"value": 2}, idempotency_key="k-1")
    assert created and not created_again and again.id == first.id
    other_tenant, created_other = await yard.submit(
        "t.echo", {"value": 1}, idempotency_key="k-1", owner="tenant-b"
    )
    assert created_other and other_tenant.id != first.id


async def test_queue_full_is_refused(make_yard: Callable[..., Conveyor]) -> None:
    async with make_yard(run_workers=False, max_queued=2) as yard:
        await yard.submit("t.echo", {"value": 1})
        await yard.submit("t.echo", {"value": 2})
        with pytest.raises(QueueFull) as caught:
            await yard.submit("t.echo", {"value": 3})
        assert caught.value.retry_after_s >= 1


async def test_explicit_retry_of_a_failed_task(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.boom", {"message": "x"})
    await yard.wait(record.id, timeout_s=10)
    again = await yard.retry(record.id)
    assert again.status is TaskStatus.QUEUED and again.error is None
    done = await yard.wait(record.id, timeout_s=10)
    assert done.status is TaskStatus.FAILED and done.attempts == 2
    ok, _ = await yard.submit("t.echo", {"value": 1})
    await yard.wait(ok.id, timeout_s=10)
    with pytest.raises(TaskStateConflict):
        await yard.retry(ok.id)


async def test_recovery_requeues_a_dead_workers_task(
    make_yard: Callable[..., Conveyor],
) -> None:
    async with make_yard(run_workers=False) as dead:
        record, _ = await dead.submit("t.flaky", {"key": "recover", "failures": 0})
        claimed = await dead.store.claim(
            worker_id="dead-worker", names=["t.flaky"], limits={}, n=1, lease_s=0.1
        )
        assert [c.id for c in claimed] == [record.id]
    async with make_yard() as alive:
        done = await alive.wait(record.id, timeout_s=20)
        assert done.status is TaskStatus.COMPLETED
        assert done.attempts == 2 and done.worker_id != "dead-worker"
        # the dead worker's late outcome is dropped: each attempt is recorded once
        late = await alive.store.finish(
            record.id, "dead-worker", 1, status=TaskStatus.FAILED, error={"type": "X"}
        )
        assert late is False
        assert (await alive.get(record.id)).status is TaskStatus.COMPLETED


async def test_recovery_fails_worker_lost_without_attempts_left(
    make_yard: Callable[..., Conveyor],
) -> None:
    async with make_yard(run_workers=False) as dead:
        record, _ = await dead.submit("t.echo", {"value": 1})
        await dead.store.claim(worker_id="dead", names=["t.echo"], limits={}, n=1, lease_s=0.1)
    async with make_yard() as alive:
        done = await alive.wait(record.id, timeout_s=20)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error["type"] == "WorkerLost"


async def test_graceful_shutdown_requeues_unfinished_work(
    make_yard: Callable[..., Conveyor],
) -> None:
    yard = make_yard(shutdown_grace_s=0.05)
    async with yard:
        record, _ = await yard.submit("t.gated", {"key": "shutdown"})
        await wait_for_status(yard, record.id, TaskStatus.RUNNING)
    async with make_yard(run_workers=False) as reader:
        after = await reader.get(record.id)
    assert after.status is TaskStatus.QUEUED and after.attempts == 0
    tasks.ASYNC_GATES.clear()


async def test_delete_only_terminal_tasks(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.echo", {"value": 1}, delay_s=3600)
    with pytest.raises(TaskStateConflict):
        await yard.delete(record.id)
    await yard.cancel(record.id)
    await yard.delete(record.id)
    assert await yard.list() == []


async def test_list_filters_and_pages(yard: Conveyor) -> None:
    ids = [(await yard.submit("t.echo", {"value": i}, delay_s=3600))[0].id for i in range(5)]
    await yard.submit("t.sync_add", {"a": 1, "b": 2}, delay_s=3600)
    first = await yard.list(name="t.echo", limit=3)
    assert [r.id for r in first] == ids[::-1][:3]
    rest = await yard.list(name="t.echo", limit=3, before_seq=first[-1].seq)
    assert [r.id for r in rest] == ids[::-1][3:]
    assert len(await yard.list(status=TaskStatus.QUEUED)) == 6


async def test_many_sync_tasks_in_the_thread_pool(yard: Conveyor) -> None:
    records = [(await yard.submit("t.sync_add", {"a": i, "b": 1}))[0] for i in range(20)]
    results = [(await yard.wait(r.id, timeout_s=10)).result for r in records]
    assert results == [i + 1 for i in range(20)]


@pytest.mark.parametrize(
    ("name", "how", "error_type"),
    [
        pytest.param("t.exits", "exit", "SystemExit", id="thread-sys-exit"),
        pytest.param("t.exits", "argparse", "SystemExit", id="thread-argparse-refusal"),
        pytest.param("t.exits", "keyboard", "KeyboardInterrupt", id="thread-ctrl-c"),
        pytest.param("t.async_exits", "exit", "SystemExit", id="async-sys-exit"),
        pytest.param("t.async_exits", "keyboard", "KeyboardInterrupt", id="async-ctrl-c"),
        pytest.param("t.async_exits", "cancelled", "CancelledError", id="async-own-cancel"),
        pytest.param("t.cpu_exits", "exit", "SystemExit", id="process-sys-exit"),
        pytest.param("t.cpu_exits", "argparse", "SystemExit", id="process-argparse-refusal"),
    ],
)
async def test_a_task_that_exits_fails_and_the_worker_goes_on(
    yard: Conveyor, name: str, how: str, error_type: str
) -> None:
    record, _ = await yard.submit(name, {"how": how})
    done = await yard.wait(record.id, timeout_s=20)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None and done.error["type"] == error_type
    assert "cannot stop its worker" in done.error["message"] or error_type == "CancelledError"
    assert done.attempts == 1, "not retried: it is no Exception (retry_on)"
    after, _ = await yard.submit("t.echo", {"value": "still here"})
    assert (await yard.wait(after.id, timeout_s=20)).result == "still here"
    worker_tasks = await yard.list(status=TaskStatus.RUNNING)
    assert worker_tasks == [], "nothing is left running"


async def test_a_cancel_request_wins_over_a_retry(yard: Conveyor) -> None:
    record, _ = await yard.submit("t.fail_after_gate", {"key": "cancel-beats-retry"})
    await wait_for_status(yard, record.id, TaskStatus.RUNNING)
    requested = await yard.cancel(record.id)
    assert requested.cancel_requested
    tasks.THREAD_GATES["cancel-beats-retry"].set()
    done = await yard.wait(record.id, timeout_s=20)
    assert done.status is TaskStatus.CANCELLED and done.attempts == 1


async def test_timed_out_sync_tasks_leave_the_engine_running(
    make_yard: Callable[..., Conveyor],
) -> None:
    keys = [f"stuck-{uuid.uuid4()}" for _ in range(3)]
    try:
        async with make_yard(concurrency=2) as yard:
            stuck = [(await yard.submit("t.thread_stuck", {"key": key}))[0] for key in keys]
            for record in stuck:
                done = await yard.wait(record.id, timeout_s=20)
                assert done.status is TaskStatus.FAILED
                assert done.error is not None and done.error["type"] == "TimeoutError"
            assert yard.abandoned_threads == 3, "the bodies still run, and are counted"
            after, _ = await yard.submit("t.sync_add", {"a": 1, "b": 2})
            done = await yard.wait(after.id, timeout_s=20)
            assert done.status is TaskStatus.COMPLETED and done.result == 3
            for key in keys:
                tasks.THREAD_GATES[key].set()
            with anyio.fail_after(10):
                while yard.abandoned_threads:
                    await anyio.sleep(0.02)
    finally:
        for key in keys:
            tasks.THREAD_GATES[key].set()


async def test_a_per_type_limit_counts_a_timed_out_body_still_running(yard: Conveyor) -> None:
    tasks.THREAD_ACTIVE.update(now=0, max=0)
    first_key, second_key = f"first-{uuid.uuid4()}", f"second-{uuid.uuid4()}"
    first, _ = await yard.submit("t.thread_stuck_limited", {"key": first_key})
    assert (await yard.wait(first.id, timeout_s=20)).status is TaskStatus.FAILED
    tasks.THREAD_GATES[second_key].set()
    second, _ = await yard.submit("t.thread_stuck_limited", {"key": second_key})
    later, _ = await yard.submit("t.echo", {"value": "after the second"})
    await yard.wait(later.id, timeout_s=20)  # the engine took tasks queued behind the second
    assert (await yard.get(second.id)).status is TaskStatus.QUEUED
    tasks.THREAD_GATES[first_key].set()
    done = await yard.wait(second.id, timeout_s=20)
    assert done.status is TaskStatus.COMPLETED
    assert tasks.THREAD_ACTIVE["max"] == 1


async def test_shutdown_does_not_wait_for_a_stuck_thread(
    make_yard: Callable[..., Conveyor],
) -> None:
    key = f"never-opens-{uuid.uuid4()}"
    try:
        with anyio.fail_after(10):
            async with make_yard(shutdown_grace_s=0.2) as yard:
                record, _ = await yard.submit("t.thread_stuck_forever", {"key": key})
                await wait_for_status(yard, record.id, TaskStatus.RUNNING)
        async with make_yard(run_workers=False) as reader:
            assert (await reader.get(record.id)).status is TaskStatus.QUEUED
    finally:
        tasks.THREAD_GATES[key].set()


async def test_a_process_task_times_out_on_its_run_not_its_wait_for_a_child(
    make_yard: Callable[..., Conveyor],
) -> None:
    async with make_yard(process_workers=1) as yard:
        records = [(await yard.submit("t.cpu_sleep", {"seconds": 1.2}))[0] for _ in range(4)]
        done = [await yard.wait(r.id, timeout_s=60) for r in records]
    assert [d.status for d in done] == [TaskStatus.COMPLETED] * 4, [d.error for d in done]
    starts = sorted(d.started_at or 0 for d in done)
    assert starts[-1] - starts[0] >= 3 * 1.0, "each started_at is when its child took it"


async def test_an_idle_child_that_died_is_replaced(make_yard: Callable[..., Conveyor]) -> None:
    async with make_yard(process_workers=1) as yard:
        first, _ = await yard.submit("t.cpu_pid", {})
        pid = (await yard.wait(first.id, timeout_s=30)).result
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(10):
            while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
                await anyio.sleep(0.02)
        second, _ = await yard.submit("t.cpu_pid", {})
        done = await yard.wait(second.id, timeout_s=30)
    assert done.status is TaskStatus.COMPLETED, done.error
    assert done.result != pid


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


async def test_waiting_leaves_nothing_behind(yard: Conveyor) -> None:
    for i in range(50):
        record, _ = await yard.submit("t.echo", {"value": i})
        await yard.wait(record.id, timeout_s=20)
        async for _ in yard.watch(record.id):
            pass
    queued, _ = await yard.submit("t.echo", {"value": "later"}, delay_s=3600)
    with pytest.raises(WaitTimeout):
        await yard.wait(queued.id, timeout_s=0.05)
    watchers = yard._watchers
    assert watchers.events == {} and watchers.waiting == {}, "one entry per task ever waited on"


async def test_an_outcome_that_cannot_be_written_is_recovered_while_the_worker_lives(
    yard: Conveyor, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = yard.store
    finish = store.finish
    failures: list[str] = []

    async def failing_once(task_id: str, *args: Any, **kwargs: Any) -> bool:
        if not failures:
            failures.append(task_id)
            raise StoreUnavailable("the database restarted at that moment")
        return await finish(task_id, *args, **kwargs)

    monkeypatch.setattr(store, "finish", failing_once)
    record, _ = await yard.submit("t.flaky", {"key": f"lost-{uuid.uuid4()}", "failures": 0})
    done = await yard.wait(record.id, timeout_s=30)
    assert failures == [record.id]
    assert done.status is TaskStatus.COMPLETED and done.attempts == 2, "recovered, then re-run"


async def test_submit_many_commits_every_task_or_none(yard: Conveyor) -> None:
    with pytest.raises(InvalidArguments) as refused:
        await yard.submit_many("t.sync_add", [{"a": 1, "b": 2}, {"a": "x", "b": 2}])
    assert refused.value.details[0]["loc"][:3] == ["items", 1, "args"]
    assert await yard.list() == [], "the valid first item was not committed either"
    records = await yard.submit_many("t.sync_add", [{"a": i, "b": 1} for i in range(5)])
    results = [(await yard.wait(r.id, timeout_s=20)).result for r in records]
    assert results == [1, 2, 3, 4, 5]
