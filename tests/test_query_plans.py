"""The plans of the SQLite store's hot statements, read with ``EXPLAIN QUERY PLAN`` on a file
with a deep backlog: none sorts the backlog or reads it whole, so each costs the same with a
hundred or a million tasks. The statements are the ones the store really runs (recorded from its
connections while it claims, finishes, renews, recovers, counts and lists), with and without
the planner's statistics (``ANALYZE``)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.status import TaskStatus
from conveyor.store import sqlite as sqlite_store
from conveyor.store import sqlite_commit
from conveyor.store.rows import TaskFilter
from conveyor.store.sqlite import SQLiteStore
from conveyor.store.sqlite_batches import BATCHES

pytestmark = pytest.mark.anyio

QUEUED = 20_000
FINISHED = 20_000


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every statement the store's connections run, with its parameters bound."""
    statements: list[str] = []
    connect = sqlite_commit._connect

    def traced(path: Path, synchronous: str, busy_timeout_s: float) -> sqlite3.Connection:
        conn = connect(path, synchronous, busy_timeout_s)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite_commit, "_connect", traced)
    yield statements


def fill(path: Path, *, analyze: bool) -> None:
    """A deep backlog: queued tasks of two types (one delayed) and many finished ones."""
    now = time.time()
    rows = []
    for i in range(QUEUED + FINISHED):
        status = "queued" if i < QUEUED else "completed"
        name = "t.echo" if i % 4 else "t.other"
        run_at = now + 3600 if i % 10 == 0 else now - 1
        rows.append((f"{i:08d}-0000-0000-0000-000000000000", name, status, "{}", now, run_at))
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO tasks (id, name, status, args, created_at, run_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("DELETE FROM task_counts")
        conn.execute(
            "INSERT INTO task_counts SELECT owner, name, status, count(*) FROM tasks "
            "GROUP BY owner, name, status"
        )
        if analyze:
            conn.execute("ANALYZE")


def plan(conn: sqlite3.Connection, statement: str) -> list[str]:
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}")]


@pytest.mark.parametrize("analyze", [False, True], ids=["no statistics", "statistics"])
async def test_hot_statements_never_sort_or_read_the_backlog(
    tmp_path: Path, recorded: list[str], analyze: bool
) -> None:
    path = tmp_path / "tasks.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    fill(path, analyze=analyze)
    recorded.clear()
    store = SQLiteStore(path)
    await store.open()
    try:
        limits = {"t.other": 2}
        claimed = await store.claim(
            worker_id="w", names=["t.echo", "t.other"], limits=limits, n=8, lease_s=30
        )
        assert len(claimed) == 8
        await store.heartbeat("w", [task.id for task in claimed], 30)
        await store.mark_started(claimed[0].id, "w", 1)
        await store.set_progress(claimed[0].id, "w", 1, 50.0, "half")
        await store.finish(claimed[0].id, "w", 1, status=TaskStatus.COMPLETED, result_json="1")
        await store.requeue(claimed[1].id, "w", 1, delay_s=1, error=None, refund_attempt=True)
        await store.recover_expired()
        await store.count_by_status()
        await store.count_by_status(owner="acme")
        for status in (TaskStatus.QUEUED, TaskStatus.COMPLETED, None):
            await store.list_tasks(owner="", status=status, limit=50)
            await store.list_tasks(owner=None, status=status, limit=50)
        await store.get(claimed[2].id, owner="")
        narrowings = [
            TaskFilter(created_after=time.time() - 60),
            TaskFilter(created_before=time.time() - 60, created_after=time.time() - 120),
            TaskFilter(id_prefix="00001234"),
            TaskFilter(batch_id="b-1"),
            TaskFilter(schedule_id="s-1"),
        ]
        for narrowed in narrowings:
            if narrowed.schedule_id is None:  # a schedule's tasks are listed with its owner
                await store.list_tasks(owner=None, narrowed=narrowed, limit=50)
            await store.list_tasks(owner="", narrowed=narrowed, limit=50)
    finally:
        await store.close()

    hot = {s for s in recorded if s.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE"))}
    assert len(hot) >= 12, hot
    conn = sqlite3.connect(path)
    plans = {statement: plan(conn, statement) for statement in hot}
    claim = next(s for s in plans if "FROM (SELECT * FROM (SELECT id, name" in s)
    assert plans[claim].count("SEARCH tasks USING INDEX tasks_queue (name=?)") == 2, plans[claim]
    assert not any(step.startswith("SCAN tasks") for step in plans[claim]), plans[claim]
    for statement, steps in plans.items():
        if "task_counts" in statement or statement == claim:
            # task_counts has one row per owner, type and status: read whole, it stays small; the
            # claim sorts only the few candidates each type's index walk gave
            continue
        prefixed = "id >= '00001234'" in statement
        scheduled = "idempotency_key >= 'schedule:s-1@'" in statement
        for step in steps:
            if prefixed:  # the sort covers the ids sharing an 8-character prefix (65 s of ids)
                assert "sqlite_autoindex_tasks_1 (id>? AND id<?)" in steps[0], (statement, steps)
                continue
            if scheduled:  # the sort covers the tasks this one schedule made
                assert "tasks_idempotency (owner=? AND idempotency_key>?" in steps[0], steps
                continue
            assert "TEMP B-TREE" not in step, (statement, steps)
            if step.startswith("SCAN tasks"):  # a full walk: only for a newest-first page
                assert "ORDER BY seq DESC LIMIT" in statement, (statement, steps)
    recovery = [s for s in plans if "lease_expires_at <" in s and s.startswith("UPDATE")]
    assert recovery and all(
        any("tasks_running" in step or "tasks_status_seq" in step for step in plans[s])
        for s in recovery
    ), {s: plans[s] for s in recovery}
    counts = [s for s in plans if "task_counts" in s and "count(" not in s.lower()]
    assert counts, "counts are read from task_counts"
    assert not any("count(*)" in s and "FROM tasks" in s for s in plans), "nothing counts rows"


async def test_a_file_from_the_previous_schema_is_counted_when_opened(tmp_path: Path) -> None:
    """A file written by the previous version (schema 2: no counts, the old queue index) gets
    the queue index and its counts from the tasks already in it."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        old = sqlite_store._SCHEMA.replace(sqlite_store._COUNTS, "").replace(BATCHES, "")
        conn.executescript(old.replace(",\n    batch_id TEXT", ""))
        conn.execute(
            "CREATE INDEX tasks_ready ON tasks(priority DESC, run_at, seq) WHERE status = 'queued'"
        )
        for i, status in enumerate(["queued", "queued", "running", "completed"]):
            conn.execute(
                "INSERT INTO tasks (id, name, owner, status, args, created_at, run_at) "
                "VALUES (?, 't.echo', 'acme', ?, '{}', 0, 0)",
                (f"{i:08d}-0000-0000-0000-000000000000", status),
            )
        conn.execute("PRAGMA user_version=2")
    store = SQLiteStore(path)
    await store.open()
    try:
        counts = await store.count_by_status(owner="acme")
        assert (counts["queued"], counts["running"], counts["completed"]) == (2, 1, 1)
        claimed = await store.claim(worker_id="w", names=["t.echo"], limits={}, n=5, lease_s=30)
        assert len(claimed) == 2
        assert (await store.count_by_status())["running"] == 3
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    assert "tasks_queue" in indexes and "tasks_ready" not in indexes
    assert "schedules" in indexes and version == sqlite_store.SCHEMA_VERSION
    assert {"batches", "batch_counts", "tasks_batch"} <= indexes
    assert "tasks_batch_status" not in indexes, "no index carries a batch item's status"


async def test_batch_and_rate_statements_stay_in_their_own_rows(
    tmp_path: Path, recorded: list[str]
) -> None:
    """Reading a batch, paging its items (by status too: that status's entries within the
    batch's seq range), counting its errors, cancelling, retrying and hastening its items, and
    a rate-limited claim walk the batch's (or the type's) own index entries, never the
    backlog."""
    from conveyor.batch_record import BatchRecord, NewTasks
    from conveyor.rates import Rate

    path = tmp_path / "tasks.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    fill(path, analyze=False)
    store = SQLiteStore(path)
    await store.open()
    try:
        now = time.time()
        ids = [f"b{i:07d}-0000-0000-0000-000000000000" for i in range(500)]
        tasks = NewTasks(
            name="t.echo",
            owner="",
            priority=0,
            max_attempts=1,
            timeout_s=None,
            created_at=now,
            run_at=now,
            batch_id="batch-1",
            chunks=[(ids, ["{}"] * 500)],
        )
        batch = BatchRecord(id="batch-1", name="t.echo", total=0, created_at=now)
        await store.batches().create(batch, tasks, max_queued=None)
        recorded.clear()
        batches = store.batches()
        await batches.get("batch-1", owner="")
        for status in (None, TaskStatus.QUEUED, TaskStatus.FAILED):
            await batches.items("batch-1", owner="", status=status, after_seq=None, limit=50)
        await batches.error_counts("batch-1")
        claimed = await store.claim(
            worker_id="w",
            names=["t.echo"],
            limits={},
            n=4,
            lease_s=30,
            rates={"t.echo": Rate(3, 1.0)},
        )
        assert len(claimed) == 3, "the rate lets three start"
        await store.rate_used("t.echo", Rate(3, 1.0))
        await batches.get("batch-1", owner="")  # with running items: their progress summed
        await batches.hasten("batch-1", owner="", error_type=None)
        await batches.retry("batch-1", owner="", statuses=(TaskStatus.FAILED,), attempts=1)
        await batches.cancel("batch-1", owner="")
    finally:
        await store.close()

    wanted = ("batch", "rate_starts")
    hot = {
        s
        for s in recorded
        if s.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE"))
        and any(w in s for w in wanted)
    }
    assert len(hot) >= 10, hot
    conn = sqlite3.connect(path)
    for statement in hot:
        steps = plan(conn, statement)
        for step in steps:
            assert not step.startswith("SCAN tasks"), (statement, steps)
            if "GROUP BY" not in statement:
                assert "TEMP B-TREE" not in step, (statement, steps)
