"""The embedded engine: workers inside the app process, the SQLite store as queue and state.

One dispatcher claims due tasks (best priority first, within the global and per-type limits) and
hands each to the :class:`~conveyor.engines.runner.Runner`, which runs it and records its outcome.
A heartbeat renews the leases of what this worker runs and picks up cancellations requested from
other processes; a recovery loop re-queues (or fails with ``WorkerLost``) tasks whose lease
expired because their worker died. A task whose worker died is therefore recovered within
``lease_s + recovery interval`` (see ``recovery_interval_s``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ..batch_record import NewTasks
from ..errors import ConveyorError
from ..record import TaskRecord
from .base import EngineHost
from .runner import Runner, new_worker_id, recover, recovery_interval_s

logger = logging.getLogger("conveyor.engine")


class LocalEngine:
    """Runs the tasks of one instance inside this process."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host
        self.settings = host.settings
        self.worker_id = new_worker_id()
        self._wake = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self.runner = Runner(
            host,
            worker_id=self.worker_id,
            threads=self.settings.concurrency,
            process_workers=self.settings.process_workers,
            on_settled=lambda record: self._wake.set(),
        )

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self.runner.bind()
        self.host.store.watch_queue(self._wake.set)  # tasks submitted by other processes
        await recover(self.host)
        await self.runner.warm()  # before claiming: no task waits for a spawn
        await self.runner.register()
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="conveyor-dispatch"),
            asyncio.create_task(self.runner.heartbeat_loop(), name="conveyor-heartbeat"),
            asyncio.create_task(self._recovery_loop(), name="conveyor-recovery"),
        ]
        logger.info("local engine %s started", self.worker_id)

    async def stop(self, grace_s: float) -> None:
        self._stopping = True
        self._wake.set()
        if self._loops:
            await self._loops[0]  # the dispatcher claims nothing more
        await self.runner.drain(grace_s)
        for loop_task in self._loops[1:]:
            loop_task.cancel()
        await asyncio.gather(*self._loops[1:], return_exceptions=True)
        await self.runner.close()

    def submitted(self, record: TaskRecord, *, retried: bool = False) -> None:
        self._wake.set()

    def submitted_batch(self, tasks: NewTasks, ids: Sequence[str]) -> None:
        if ids:
            self._wake.set()

    def cancel_local(self, task_id: str) -> bool:
        return self.runner.cancel_local(task_id)

    @property
    def abandoned_threads(self) -> int:
        return self.runner.threads.abandoned_total

    # loops -------------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        types = self.host.task_types
        names = list(types)
        limits = {name: t.options.concurrency for name, t in types.items() if t.options.concurrency}
        rates = {name: t.options.rate for name, t in types.items() if t.options.rate}
        store = self.host.store
        running = self.runner.running
        while not self._stopping:
            free = self.settings.concurrency - len(running)
            if free > 0:
                self._wake.clear()
                try:
                    claimed = await store.claim(
                        worker_id=self.worker_id,
                        names=names,
                        limits=self.runner.limits(limits),
                        n=free,
                        lease_s=self.settings.lease_s,
                        rates=rates,
                    )
                except ConveyorError as exc:
                    logger.error("claim failed: %s", exc)
                    claimed = []
                    await asyncio.sleep(self.settings.poll_s)
                for record in claimed:
                    self.runner.launch(record)
                if claimed and len(claimed) == free:
                    continue
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
            except TimeoutError:
                pass

    async def _recovery_loop(self) -> None:
        interval = recovery_interval_s(self.settings.lease_s)
        while True:
            await asyncio.sleep(interval)
            if await recover(self.host):
                self._wake.set()
