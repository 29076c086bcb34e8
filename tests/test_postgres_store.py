"""The PostgreSQL store on a real server: schema migrations and what the sweeper is told to send."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from conveyor.errors import StoreUnavailable
from conveyor.ids import uuid7
from conveyor.record import TaskRecord
from conveyor.status import TaskStatus
from conveyor.store.postgres import PostgresStore
from conveyor.store.postgres_counts import BY_STATUS, BY_TYPE, QUEUED
from conveyor.store.postgres_ledger import CLAIM_ONE
from conveyor.store.postgres_schema import SCHEMA_VERSION
from conveyor.store.postgres_sql import FINISH

from .support.services import PostgresServer


def run(work: Callable[[PostgresStore, str], Awaitable[Any]], url: str) -> Any:
    async def main() -> Any:
        store = PostgresStore(url)
        await store.open()
        try:
            return await work(store, url)
        finally:
            await store.close()

    return asyncio.run(main())


async def sql(url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


CLAIM_TYPES = "text, text, text, float8, text, text, text, text, text, text, int"


async def explain(conn: asyncpg.Connection, statement: str, types: str, params: str) -> str:
    """The plan ``conn`` makes for ``statement`` prepared with ``types`` and run with ``params``
    (SQL literals), under its current ``plan_cache_mode``."""
    await conn.execute(f"PREPARE explained ({types}) AS {statement}")
    try:
        rows = await conn.fetch(f"EXPLAIN EXECUTE explained ({params})")
    finally:
        await conn.execute("DEALLOCATE explained")
    return "\n".join(row[0] for row in rows)


async def add(store: PostgresStore, *, delay_s: float = 0.0) -> str:
    now = time.time()
    record = TaskRecord(
        id=uuid7(),
        name="demo.echo",
        status=TaskStatus.QUEUED,
        args={},
        created_at=now,
        run_at=now + delay_s,
    )
    await store.insert(record, args_json="{}", max_queued=None)
    return record.id


# Versions 1 and 2 also notified a channel of cancel requests, which every worker listened to.
VERSION_1_NOTIFY = """
CREATE OR REPLACE FUNCTION conveyor_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.cancel_requested AND NOT OLD.cancel_requested THEN
        PERFORM pg_notify('conveyor_cancel', NEW.id);
    END IF;
    PERFORM pg_notify('conveyor_tasks', COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END $$ LANGUAGE plpgsql;
"""


def test_a_version_1_store_is_migrated(postgres: PostgresServer) -> None:
    url = postgres.create_database()

    async def downgrade(store: PostgresStore, url: str) -> str:
        task_id = await add(store)
        await sql(url, "DROP INDEX conveyor_tasks_unpublished")
        await sql(url, VERSION_1_NOTIFY)
        await sql(url, "UPDATE conveyor_schema SET version = 1")
        await sql(url, "UPDATE conveyor_tasks SET published_at = NULL")  # its message was lost
        return task_id

    task_id = run(downgrade, url)

    async def reopen(store: PostgresStore, url: str) -> tuple[Any, ...]:
        version = await sql(url, "SELECT version FROM conveyor_schema")
        index = await sql(
            url, "SELECT 1 FROM pg_indexes WHERE indexname = $1", "conveyor_tasks_unpublished"
        )
        due = await store.publication_ledger().due_for_publish(stale_s=None, limits={})
        trigger = await sql(url, "SELECT prosrc FROM pg_proc WHERE proname = 'conveyor_notify'")
        return [row[0] for row in version], len(index), due, trigger[0][0]

    versions, indexes, due, trigger = run(reopen, url)
    assert versions == [SCHEMA_VERSION] and SCHEMA_VERSION >= 3 and indexes == 1
    assert due == [(task_id, "demo.echo", 0)], "the migrated store still finds unsent tasks"
    assert "conveyor_cancel" not in trigger and "conveyor_tasks" in trigger


def test_a_store_newer_than_this_conveyor_is_refused(postgres: PostgresServer) -> None:
    url = postgres.create_database()
    run(lambda store, url: sql(url, "UPDATE conveyor_schema SET version = 99"), url)
    with pytest.raises(StoreUnavailable, match="upgrade Conveyor"):
        run(lambda store, url: asyncio.sleep(0), url)


def test_the_sweeper_is_told_what_to_send_once(postgres: PostgresServer) -> None:
    async def scenario(store: PostgresStore, url: str) -> None:
        sent = await add(store)  # published when committed: the submitter sends its message
        delayed = await add(store, delay_s=3600)
        lost = await add(store)
        await sql(url, "UPDATE conveyor_tasks SET published_at = NULL WHERE id = $1", lost)
        stale = await add(store)
        # sent when it fell due, long ago (its message lost with the broker)
        await sql(
            url, "UPDATE conveyor_tasks SET run_at = 1, published_at = 1 WHERE id = $1", stale
        )

        first = {
            row[0]
            for row in await store.publication_ledger().due_for_publish(stale_s=None, limits={})
        }
        assert first == {lost}, "only the unsent due task: not the delayed, not the stale one"
        assert await store.publication_ledger().due_for_publish(stale_s=None, limits={}) == [], (
            "marked sent"
        )
        with_stale = {
            row[0]
            for row in await store.publication_ledger().due_for_publish(stale_s=60, limits={})
        }
        assert with_stale == {stale}, "an old message is re-sent on the stale sweep"
        await sql(url, "UPDATE conveyor_tasks SET run_at = run_at - 3601 WHERE id = $1", delayed)
        due_now = {
            row[0]
            for row in await store.publication_ledger().due_for_publish(stale_s=None, limits={})
        }
        assert due_now == {delayed}, "a delayed task is sent once it falls due"
        assert sent not in first | with_stale | due_now

    run(scenario, postgres.create_database())


async def statuses(url: str, *task_ids: str) -> list[str]:
    rows = await sql(url, "SELECT id, status FROM conveyor_tasks WHERE id = ANY($1)", task_ids)
    found = {row[0]: row[1] for row in rows}
    return [found[task_id] for task_id in task_ids]


async def claim(store: PostgresStore, task_id: str, worker: str = "w:1") -> TaskRecord | None:
    return await store.publication_ledger().claim_one(
        task_id, name="demo.echo", worker_id=worker, limit=None, lease_s=30
    )


async def finish_later(store: PostgresStore, record: TaskRecord, value: int) -> asyncio.Task[bool]:
    """An outcome handed to the store (held for the next claim), not yet awaited."""
    finishing = asyncio.create_task(
        store.finish(
            record.id,
            "w:1",
            record.attempts,
            status=TaskStatus.COMPLETED,
            result_json=str(value),
        )
    )
    await asyncio.sleep(0)  # the store holds it now
    return finishing


def test_an_outcome_goes_with_the_next_claim_or_on_its_own(postgres: PostgresServer) -> None:
    async def scenario(store: PostgresStore, url: str) -> None:
        first, second, third = await add(store), await add(store), await add(store)
        running = await claim(store, first)
        assert running is not None and running.id == first
        finishing = await finish_later(store, running, 1)
        # the next message's claim carries the outcome
        claimed = await claim(store, second)
        assert claimed is not None and claimed.id == second
        assert await finishing is True
        assert await statuses(url, first, second, third) == ["completed", "running", "queued"]
        # with no claim after it, it is written on its own
        assert await store.finish(
            second, "w:1", claimed.attempts, status=TaskStatus.COMPLETED, result_json="2"
        )
        rows = await sql(url, "SELECT result, progress FROM conveyor_tasks WHERE id = $1", second)
        assert (rows[0][0], rows[0][1]) == ("2", 100)
        # an outcome for an attempt this worker no longer holds is refused, held or not
        third_claim = await claim(store, third)
        assert third_claim is not None
        stale = await store.finish(third, "w:other", 1, status=TaskStatus.COMPLETED)
        assert stale is False
        assert await statuses(url, third) == ["running"]

    run(scenario, postgres.create_database())


def test_an_outcome_held_when_its_own_message_comes_again(postgres: PostgresServer) -> None:
    """A redelivered message for the task whose outcome is held claims nothing, and the outcome
    is still written (one statement never updates that row twice)."""

    async def scenario(store: PostgresStore, url: str) -> None:
        task_id = await add(store)
        running = await claim(store, task_id)
        assert running is not None
        finishing = await finish_later(store, running, 7)
        assert await claim(store, task_id) is None, "running: the duplicate is dropped"
        assert await finishing is True
        rows = await sql(url, "SELECT status, result FROM conveyor_tasks WHERE id = $1", task_id)
        assert (rows[0][0], rows[0][1]) == ("completed", "7")

    run(scenario, postgres.create_database())


def test_an_outcome_survives_a_claim_that_fails(postgres: PostgresServer) -> None:
    async def scenario(store: PostgresStore, url: str) -> None:
        first, second = await add(store), await add(store)
        running = await claim(store, first)
        assert running is not None
        finishing = await finish_later(store, running, 3)
        with pytest.raises(StoreUnavailable):  # a lease the statement cannot take
            await store.publication_ledger().claim_one(
                second,
                name="demo.echo",
                worker_id="w:1",
                limit=None,
                lease_s="soon",  # type: ignore[arg-type]
            )
        assert await finishing is True
        assert await statuses(url, first, second) == ["completed", "queued"]

    run(scenario, postgres.create_database())


def test_outcomes_are_written_by_id_however_many_tasks_a_worker_holds(
    postgres: PostgresServer,
) -> None:
    """Before the table's first ANALYZE, a generic plan must still find a held task by its id,
    not by scanning every task its worker runs."""

    async def scenario(store: PostgresStore, url: str) -> list[str]:
        for _ in range(200):
            await add(store)
        await sql(url, "UPDATE conveyor_tasks SET status = 'running', worker_id = 'w:1'")
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            plans = []
            for statement, types in (
                (FINISH, "text, text, text, text, text, text, int"),
                (CLAIM_ONE, CLAIM_TYPES),
            ):
                blanks = ", ".join(["NULL"] * (types.count(",") + 1))
                plans.append(await explain(conn, statement, types, blanks))
            return plans
        finally:
            await conn.close()

    finish_plan, claim_plan = run(scenario, postgres.create_database())
    assert "conveyor_tasks_running " not in finish_plan, finish_plan
    assert "conveyor_tasks_id_key" in finish_plan
    assert "conveyor_tasks_running " not in claim_plan, claim_plan


def test_a_claim_reads_the_queue_in_order_after_a_vacuum_without_analyze(
    postgres: PostgresServer,
) -> None:
    """A plain VACUUM of a backlog counts the table's rows but leaves no column statistics: the
    planner then guessed a handful of queued tasks, and each claim read and sorted all of them
    (measured: 50-100 ms a claim with 60,000 queued, against 0.6 ms)."""

    async def scenario(store: PostgresStore, url: str) -> str:
        await sql(
            url,
            "INSERT INTO conveyor_tasks (id, name, status, args, created_at, run_at) "
            "SELECT gen_random_uuid()::text, 'demo.echo', 'queued', '{}', 0, 0 "
            "FROM generate_series(1, 60000)",
        )
        await sql(url, "VACUUM conveyor_tasks")
        async with store.connection() as conn:  # the store's own connections and their settings
            first = await conn.fetchval("SELECT id FROM conveyor_tasks ORDER BY seq LIMIT 1")
            params = f"'{first}', 'demo.echo', 'w', 30, " + ", ".join(["NULL"] * 7)
            plans = []
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                plans.append(await explain(conn, CLAIM_ONE, CLAIM_TYPES, params))
            await conn.execute("RESET plan_cache_mode")
        return "\n\n".join(plans)

    plan = run(scenario, postgres.create_database())
    assert "Sort" not in plan, plan
    assert "conveyor_tasks_ready_by_name" in plan, plan


def test_the_database_clock_decides_when_a_task_is_due(postgres: PostgresServer) -> None:
    """An API host whose clock runs ahead (or behind) of the database's does not delay tasks:
    a task due now is due on the database's clock, and a delay counts from it."""

    async def work(store: PostgresStore, url: str) -> None:
        ahead = time.time() + 5.0  # the submitting host's clock, 5 s ahead
        due_now = TaskRecord(
            id=uuid7(),
            name="demo.echo",
            status=TaskStatus.QUEUED,
            args={},
            created_at=ahead,
            run_at=ahead,
        )
        delayed = TaskRecord(
            id=uuid7(),
            name="demo.echo",
            status=TaskStatus.QUEUED,
            args={},
            created_at=ahead,
            run_at=ahead + 60,
        )
        for record in (due_now, delayed):
            await store.insert(record, args_json="{}", max_queued=None)
        (db_now,) = (await sql(url, "SELECT extract(epoch from clock_timestamp())::float8"))[0]
        assert due_now.created_at <= db_now and due_now.run_at == due_now.created_at
        assert 59 <= delayed.run_at - db_now <= 61
        claimed = await store.claim(worker_id="w", names=["demo.echo"], limits={}, n=5, lease_s=30)
        assert [r.id for r in claimed] == [due_now.id]

    run(work, postgres.create_database())


def new_task(name: str, owner: str = "", *, key: str | None = None) -> TaskRecord:
    now = time.time()
    return TaskRecord(
        id=uuid7(),
        name=name,
        status=TaskStatus.QUEUED,
        args={},
        owner=owner,
        created_at=now,
        run_at=now,
        idempotency_key=key,
    )


async def grouped(url: str) -> dict[tuple[str, str, str], int]:
    """The counts as a scan of the whole table gives them."""
    rows = await sql(
        url, "SELECT owner, name, status, count(*) FROM conveyor_tasks GROUP BY 1, 2, 3"
    )
    return {(r[0], r[1], r[2]): r[3] for r in rows}


async def kept(url: str) -> dict[tuple[str, str, str], int]:
    """The counts the database keeps, summed over its connections' shards."""
    rows = await sql(
        url,
        "SELECT owner, name, status, sum(n) FROM conveyor_task_counts "
        "GROUP BY 1, 2, 3 HAVING sum(n) <> 0",
    )
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def test_counts_are_kept_by_the_database_through_every_change(postgres: PostgresServer) -> None:
    """Every way a task is added, changes status or goes (alone, in a batch, from several
    connections at once, by retention) moves the kept counts exactly as the table changed; the
    counts read by ``/health``, ``/metrics`` and ``429`` come from them, and survive the fold
    of closed connections' rows."""
    url = postgres.create_database()

    async def workload(store: PostgresStore, url: str) -> dict[str, Any]:
        await store.insert_many(
            [new_task("t.a", "acme") for _ in range(50)], args_json=["{}"] * 50, max_queued=None
        )
        for i in range(20):
            record = new_task("t.b", key=f"k{i % 4}" if i % 2 else None)
            await store.insert(record, args_json="{}", max_queued=None)

        async def one_connection_s_work(worker: str) -> None:
            claimed = await store.claim(
                worker_id=worker, names=["t.a", "t.b"], limits={}, n=10, lease_s=30
            )
            for task in claimed[:6]:
                await store.finish(task.id, worker, 1, status=TaskStatus.COMPLETED, result_json="1")
            await store.requeue(
                claimed[6].id, worker, 1, delay_s=0, error=None, refund_attempt=True
            )
            await store.finish(
                claimed[7].id, worker, 1, status=TaskStatus.FAILED, error={"type": "E"}
            )
            await store.cancel(claimed[8].id, owner=None)

        await asyncio.gather(*(one_connection_s_work(f"w{i}") for i in range(4)))
        failed = await store.list_tasks(owner=None, status=TaskStatus.FAILED)
        await store.retry(failed[0].id, owner=None, attempts=1)
        done = await store.list_tasks(owner=None, status=TaskStatus.COMPLETED, limit=3)
        await store.delete(done[0].id, owner=None)
        await store.retention().purge("completed", finished_before=time.time() + 1, limit=5)
        await sql(url, "UPDATE conveyor_tasks SET lease_expires_at = 0 WHERE status = 'running'")
        await store.recover_expired()
        await store.set_progress(done[1].id, "w0", 1, 10.0, None)  # no status: no count moved
        snapshot = await store.stats().snapshot()
        return {
            "grouped": await grouped(url),
            "kept": await kept(url),
            "by_status": await store.count_by_status(),
            "acme": await store.count_by_status(owner="acme"),
            "snapshot": snapshot.counts,
        }

    found = run(workload, url)
    table = found["grouped"]
    assert found["kept"] == table
    for status in TaskStatus:
        assert found["by_status"][status.value] == sum(
            n for (_, _, s), n in table.items() if s == status.value
        )
    assert sum(found["acme"].values()) == sum(n for (o, _, _), n in table.items() if o == "acme")
    assert found["snapshot"] == {
        (name, status): sum(n for (_, nm, st), n in table.items() if (nm, st) == (name, status))
        for (_, name, status) in table
    }
    assert sum(table.values()) == 50 + 12 - 1 - 5, "keyed repeats added nothing; 6 deleted"

    async def later(store: PostgresStore, url: str) -> tuple[Any, ...]:
        before = await kept(url)
        await store.stats().prune("none", "0")  # the upkeep that folds closed connections
        shards = await sql(url, "SELECT DISTINCT shard FROM conveyor_task_counts")
        plans = [
            await explain_plain(url, statement.replace("$1", "NULL"))
            for statement in (QUEUED, BY_STATUS, BY_TYPE)
        ]
        return before, await kept(url), [r[0] for r in shards], plans

    before, after, shards, plans = run(later, url)
    assert before == after == table, "folding moves counts, never changes them"
    assert shards == [0], "the first run's connections have closed: their rows folded"
    assert all("conveyor_tasks" not in plan.replace("conveyor_task_counts", "") for plan in plans)


async def explain_plain(url: str, statement: str) -> str:
    return "\n".join(row[0] for row in await sql(url, f"EXPLAIN {statement}"))
