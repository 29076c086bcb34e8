"""Batches: many tasks of one type submitted as one, with counts by status.

A batch is committed in one transaction with all its tasks (``BatchStore.create``), its items
checked and made a chunk at a time while the store writes the ones before; each item is
an ordinary task carrying the batch's id, run, retried and cancelled like any other. The batch's
counts are read from the store (kept per batch, not counted item by item, on SQLite), so a
client can follow a batch of 100,000 as cheaply as one of ten.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from .batch_record import BatchRecord
from .engines.base import Engine
from .errors import BatchExists, BatchNotFound, InvalidArguments
from .ids import uuid7
from .record import TaskRecord
from .settings import Settings
from .status import TaskStatus
from .store.base import BatchStore, Store
from .tally import Tally
from .task import UNSET, TaskType, new_tasks

# Counts are streamed at most this often: a batch's events are coalesced, not one per item.
EVENTS_INTERVAL_S = 0.25
RETRYABLE = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED})
# A batch submitted under an idempotency key gets an id derived from (owner, key).
_KEYED = uuid.UUID("5b0c8a52-6a0e-4c1f-9d39-2f7a8e1c0b64")


class BatchHost(Protocol):
    """What batches need of :class:`~conveyor.core.Conveyor`."""

    settings: Settings
    tally: Tally

    @property
    def task_types(self) -> Mapping[str, TaskType[Any, Any]]: ...

    @property
    def store(self) -> Store: ...

    @property
    def engine(self) -> Engine | None: ...

    def task_type(self, name: str, *, public_only: bool = False) -> TaskType[Any, Any]: ...

    def notify(self, task_id: str) -> None: ...


class Batches:
    """The batches of one :class:`~conveyor.core.Conveyor` (``yard.batches``)."""

    def __init__(self, host: BatchHost) -> None:
        self._host = host

    @property
    def _store(self) -> BatchStore:
        return self._host.store.batches()

    async def submit(
        self,
        name: str,
        items: Iterable[Mapping[str, Any]],
        *,
        owner: str = "",
        priority: int | None = None,
        delay_s: float | None = None,
        timeout_s: float | None = UNSET,
        public_only: bool = False,
        meta: Mapping[str, Any] | None = None,
        batch_id: str | None = None,
        checked: bool = False,
    ) -> BatchRecord:
        """Commit the batch and its tasks in one transaction: all of them or none
        (``InvalidArguments`` locating the item, ``QueueFull``). The items are validated and
        written a chunk at a time, so ``items`` may be a generator (which may raise to refuse
        the batch). ``checked``: the items are complete arguments a service built
        from checked input (not validated again)."""
        host = self._host
        task_type = host.task_type(name, public_only=public_only)
        batch_id = batch_id or uuid7()
        tasks = new_tasks(
            task_type,
            items,
            owner=owner,
            priority=priority,
            delay_s=delay_s,
            timeout_s=timeout_s,
            batch_id=batch_id,
            checked=checked,
        )
        ids: list[str] = []
        made = tasks.chunks

        def noted() -> Iterator[tuple[list[str], list[str]]]:
            for chunk in made:
                ids.extend(chunk[0])
                yield chunk

        tasks.chunks = noted()
        batch = BatchRecord(
            id=batch_id,
            name=task_type.name,
            total=0,
            owner=owner,
            created_at=tasks.created_at,
            meta=dict(meta or {}),
        )
        stored = await self._store.create(batch, tasks, max_queued=host.settings.max_queued)
        host.tally.count("conveyor_tasks_submitted", {"task": task_type.name}, len(ids))
        if host.engine is not None:
            host.engine.submitted_batch(tasks, ids)
        return stored

    async def submit_once(
        self,
        key: str,
        name: str,
        items: Iterable[Mapping[str, Any]],
        *,
        owner: str = "",
        **options: Any,
    ) -> tuple[BatchRecord, bool]:
        """:meth:`submit` under an idempotency key: the batch this owner first submitted with
        ``key`` and ``False``, or the new batch and ``True``. Two racing submissions with one
        key commit one batch (its id is derived from the owner and the key)."""
        batch_id = str(uuid.uuid5(_KEYED, f"{owner}\x00{key}"))
        try:
            return await self.get(batch_id, owner=owner), False
        except BatchNotFound:
            pass
        try:
            return await self.submit(name, items, owner=owner, batch_id=batch_id, **options), True
        except BatchExists:
            return await self.get(batch_id, owner=owner), False

    async def get(self, batch_id: str, *, owner: str | None = None) -> BatchRecord:
        return await self._store.get(batch_id, owner=owner)

    async def list_batches(
        self,
        *,
        owner: str | None = None,
        limit: int = 50,
        before: float | None = None,
        name: str | None = None,
    ) -> list[BatchRecord]:
        """Batches, newest first (``before``: created before this epoch time; ``name``: of
        that task type only)."""
        return await self._store.list_batches(owner=owner, limit=limit, before=before, name=name)

    async def items(
        self,
        batch_id: str,
        *,
        owner: str | None = None,
        status: TaskStatus | None = None,
        after_seq: int | None = None,
        limit: int = 100,
        only_error: str | None = None,
        except_error: str | None = None,
    ) -> list[TaskRecord]:
        """The batch's tasks in submission order (``after_seq``: the cursor of the page), of one
        status and error type (``only_error``) or not of it (``except_error``) when given."""
        return await self._store.items(
            batch_id,
            owner=owner,
            status=status,
            after_seq=after_seq,
            limit=limit,
            only_error=only_error,
            except_error=except_error,
        )

    async def error_counts(self, batch_id: str) -> dict[tuple[str, str], int]:
        """Items carrying an error, by ``(status, error type)``."""
        return await self._store.error_counts(batch_id)

    async def cancel(self, batch_id: str, *, owner: str | None = None) -> BatchRecord:
        """Cancel the queued items at once; ask the running ones to stop."""
        _, running = await self._store.cancel(batch_id, owner=owner)
        engine = self._host.engine
        for task_id in running:
            if engine is not None:
                engine.cancel_local(task_id)
            self._host.notify(task_id)
        return await self.get(batch_id, owner=owner)

    async def retry(
        self,
        batch_id: str,
        *,
        owner: str | None = None,
        statuses: Collection[TaskStatus] = (TaskStatus.FAILED,),
        only_error: str | None = None,
        except_error: str | None = None,
    ) -> BatchRecord:
        """Re-run the items in ``statuses`` (failed by default; failed and/or cancelled), of
        those only the ones whose error type is ``only_error``, or is not ``except_error``."""
        wrong = [status.value for status in statuses if status not in RETRYABLE]
        if wrong or not statuses:
            raise InvalidArguments(
                "only failed or cancelled items can be retried",
                details=[{"loc": ["query", "status"], "msg": f"not retryable: {wrong}"}],
            )
        batch = await self.get(batch_id, owner=owner)
        task_type = self._host.task_types.get(batch.name)
        attempts = 1 if task_type is None else task_type.options.max_attempts
        records = await self._store.retry(
            batch_id,
            owner=owner,
            statuses=statuses,
            attempts=attempts,
            only_error=only_error,
            except_error=except_error,
        )
        self._requeued(records)
        return await self.get(batch_id, owner=owner)

    async def retry_now(
        self, batch_id: str, *, owner: str | None = None, error_type: str | None = None
    ) -> BatchRecord:
        """Make the queued items that wait for a retry (after an error of ``error_type``, or
        any) due now, instead of at the end of their backoff."""
        records = await self._store.hasten(batch_id, owner=owner, error_type=error_type)
        self._requeued(records)
        return await self.get(batch_id, owner=owner)

    def _requeued(self, records: Sequence[TaskRecord]) -> None:
        engine = self._host.engine
        for record in records:
            if engine is not None:
                engine.submitted(record, retried=True)
            self._host.notify(record.id)

    async def watch(
        self, batch_id: str, *, owner: str | None = None, interval_s: float = EVENTS_INTERVAL_S
    ) -> AsyncIterator[BatchRecord]:
        """Yield the batch each time its counts or progress change, at most once per
        ``interval_s``; the stream ends after the batch has no queued or running item."""
        last: tuple[Any, ...] | None = None
        while True:
            batch = await self.get(batch_id, owner=owner)
            key = (tuple(sorted(batch.counts.items())), batch.progress)
            if key != last:
                last = key
                yield batch
            if not batch.active:
                return
            await asyncio.sleep(interval_s)
