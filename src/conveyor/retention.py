"""Retention: finished tasks, their blobs and log lines are deleted ``CONVEYOR_RESULT_TTL``
after they finished (default seven days; ``none`` keeps them).

Every process that runs workers purges on its own every ``interval_s`` (a tenth of the TTL,
between one second and a minute), a batch of ``BATCH`` tasks per transaction with a turn of the
event loop between batches, so a purge of a million tasks never holds submissions back for
more than one small transaction. Processes sharing a store purge side by side safely: a
task is deleted once (SQLite serialises writes; PostgreSQL skips rows another purge holds).
``conveyor purge --older-than 1d [--status failed]`` runs one purge by hand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Protocol

from .blobs import BlobStore
from .errors import ConveyorError
from .settings import Settings
from .status import TERMINAL, TaskStatus
from .store.base import Store

logger = logging.getLogger("conveyor.retention")

BATCH = 500


class RetentionHost(Protocol):
    settings: Settings

    @property
    def store(self) -> Store: ...

    @property
    def blobs(self) -> BlobStore: ...


class Retention:
    """``yard.retention``: purge by hand, and the periodic purge of expired tasks."""

    def __init__(self, host: RetentionHost) -> None:
        self._host = host
        self._loop: asyncio.Task[None] | None = None
        #: tasks the periodic purge deleted since start; ``passed`` is set after each pass
        self.deleted = 0
        self.passed = asyncio.Event()

    async def purge(
        self,
        older_than_s: float,
        *,
        statuses: Collection[TaskStatus] = TERMINAL,
        batch: int = BATCH,
    ) -> int:
        """Delete the tasks of ``statuses`` (terminal ones) that finished more than
        ``older_than_s`` ago, with their blobs and log lines: how many were deleted."""
        wrong = [status.value for status in statuses if status not in TERMINAL]
        if wrong:
            raise ValueError(f"only finished tasks can be purged, not {wrong}")
        cutoff = time.time() - older_than_s
        store, blobs = self._host.store.retention(), self._host.blobs
        deleted = 0
        for status in sorted(statuses, key=lambda s: s.value):
            while True:
                ids = await store.purge(status.value, finished_before=cutoff, limit=batch)
                if ids:
                    await asyncio.to_thread(_delete_blobs, blobs, ids)
                deleted += len(ids)
                if len(ids) < batch:
                    break
                await asyncio.sleep(0)  # a turn of the loop: submissions go between batches
        return deleted

    def start(self) -> None:
        ttl = self._host.settings.result_ttl_s
        if ttl is not None and self._loop is None:
            self._loop = asyncio.create_task(self._run(ttl), name="conveyor-retention")

    async def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    async def _run(self, ttl_s: float) -> None:
        interval = min(60.0, max(1.0, ttl_s / 10))
        while True:
            try:
                deleted = await self.purge(ttl_s)
                self.deleted += deleted
                if deleted:
                    logger.info("deleted %d tasks finished more than %gs ago", deleted, ttl_s)
            except ConveyorError as exc:
                logger.error("retention purge failed: %s", exc)
            self.passed.set()
            await asyncio.sleep(interval)


def _delete_blobs(blobs: BlobStore, task_ids: list[str]) -> None:
    for task_id in task_ids:
        blobs.delete_task(task_id)
