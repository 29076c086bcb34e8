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
from conveyor.store.postgres import SCHEMA_VERSION, PostgresStore

from .services import PostgresServer


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
        due = await store.due_for_publish(stale_s=None, limits={})
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

        first = {row[0] for row in await store.due_for_publish(stale_s=None, limits={})}
        assert first == {lost}, "only the unsent due task: not the delayed, not the stale one"
        assert await store.due_for_publish(stale_s=None, limits={}) == [], "marked sent"
        with_stale = {row[0] for row in await store.due_for_publish(stale_s=60, limits={})}
        assert with_stale == {stale}, "an old message is re-sent on the stale sweep"
        await sql(url, "UPDATE conveyor_tasks SET run_at = run_at - 3601 WHERE id = $1", delayed)
        due_now = {row[0] for row in await store.due_for_publish(stale_s=None, limits={})}
        assert due_now == {delayed}, "a delayed task is sent once it falls due"
        assert sent not in first | with_stale | due_now

    run(scenario, postgres.create_database())
