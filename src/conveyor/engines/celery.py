"""The Celery engine: the same task types, run by Celery workers on any number of machines.

The PostgreSQL store stays the truth; the broker only carries "run task <id>" messages.

* **Submit**: the API commits the task, then publishes one message (JSON, the task id) named
  after the task type, from a publisher thread (:mod:`.celery_publish`) so the event loop never
  waits for the broker.
* **Sweep**: every process of the deployment (the API, and each worker process) re-publishes
  queued tasks that are due and have no live message: delayed tasks and retries when they fall
  due (no broker ETAs, which Redis visibility timeouts turn into duplicates), messages lost with
  a broker restart (after ``republish_after_s``), and tasks whose type had no room when their
  message came. It also recovers tasks whose lease expired, with the embedded engine's rules.
* **Run**: a worker process claims the task in the store before running it; a message for a task
  that is finished, cancelled, not yet due, or running under a live lease is acknowledged and
  dropped. The claimed task then runs in the shared :class:`~conveyor.engines.runner.Runner`
  (coroutines on the process's own event loop, sync functions in its threads, CPU-bound ones in
  a child process), which enforces timeouts, records progress and outcome, renews the lease and
  stops a task whose cancel was requested.
* **Acknowledgement**: late (``acks_late``), and a message whose worker process died is
  rejected back to the queue; its redelivery finds the task still leased to the dead worker and
  is dropped, and lease recovery re-queues it only while attempts remain. A task that kills its
  worker therefore runs at most ``max_attempts`` times.

Processes: ``conveyor worker`` (or ``celery -A <module>:<celery app> worker``) runs a prefork
pool; each pool process starts its own runtime after the fork (:mod:`.celery_worker`).
``Conveyor(run_workers=True)`` with this engine runs an embedded Celery worker (thread pool)
inside the app instead, with ``settings.concurrency`` threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery

from ..batch_record import NewTasks
from ..errors import ConfigurationError, ConveyorError
from ..record import TaskRecord
from ..store.base import PublicationLedger
from .base import EngineHost
from .celery_publish import Publisher
from .runner import Runner, new_worker_id, recover, recovery_interval_s

logger = logging.getLogger("conveyor.engine")

# This process's running Celery engine per host: the embedded one, or the one a pool process
# started on its own loop (see celery_worker.runtime_for).
RUNTIMES: dict[int, CeleryEngine] = {}
RUNTIMES_LOCK = threading.Lock()


def _forget_runtimes_after_fork() -> None:
    """A forked process (a prefork pool process) has none of its parent's runtimes: their loop
    threads stayed behind."""
    global RUNTIMES_LOCK
    RUNTIMES.clear()
    RUNTIMES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_runtimes_after_fork)


class CeleryEngine:
    """The Celery engine in one process: publishes, sweeps, and (when asked) runs tasks.

    Args:
        host: the started instance.
        celery: its Celery app.
        execute: this process runs tasks (holds a :class:`Runner`).
        consume: run an embedded Celery worker (thread pool) that feeds the runner; False in a
            Celery pool process, where Celery calls the task handlers itself.
    """

    def __init__(self, host: EngineHost, celery: Celery, *, execute: bool, consume: bool) -> None:
        self.host = host
        self.settings = host.settings
        self.worker_id = new_worker_id()
        self.celery = celery
        self._execute = execute
        self._consume = consume and execute
        self._stopping = False
        self._claiming = 0
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._publisher: Publisher | None = None
        self._worker: Any = None
        self._worker_thread: threading.Thread | None = None
        self.runner: Runner | None = None
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        ledger = host.store.publication_ledger()
        if ledger is None:
            raise ConfigurationError("the celery engine needs the PostgreSQL store")
        self.ledger: PublicationLedger = ledger
        types = host.task_types
        self._limits = {n: t.options.concurrency for n, t in types.items() if t.options.concurrency}
        self._rates = {n: t.options.rate for n, t in types.items() if t.options.rate}
        if execute:
            self.runner = Runner(
                host,
                worker_id=self.worker_id,
                threads=self.settings.concurrency,
                process_workers=self.settings.process_workers if consume else 1,
                on_settled=self._settled,
            )

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._publisher = Publisher(self.celery, self.settings, on_failed=self.publish_failed)
        await recover(self.host)
        self._loops = [asyncio.create_task(self._sweep_loop(), name="conveyor-sweep")]
        if self.runner is not None:
            self.runner.bind()
            if self._consume:  # a pool process runs one task at a time: its child comes on use
                await self.runner.warm()
            else:
                self.runner.concurrency = 1
            await self.runner.register()
            self._loops.append(
                asyncio.create_task(self.runner.heartbeat_loop(), name="conveyor-heartbeat")
            )
        if self._consume:
            with RUNTIMES_LOCK:
                RUNTIMES[id(self.host)] = self
            await asyncio.to_thread(self._start_consumer)
        logger.info(
            "celery engine %s started (%s)",
            self.worker_id,
            "embedded worker" if self._consume else "worker" if self._execute else "publisher",
        )

    async def stop(self, grace_s: float) -> None:
        self._stopping = True
        deadline = self.loop.time() + 5.0
        while self._claiming and self.loop.time() < deadline:  # its task is then launched,
            await asyncio.sleep(0.005)  # so the drain re-queues it with the others
        if self.runner is not None:
            await self.runner.drain(grace_s)
        if self._worker_thread is not None:
            await asyncio.to_thread(self._stop_consumer)
        with RUNTIMES_LOCK:
            if RUNTIMES.get(id(self.host)) is self:
                del RUNTIMES[id(self.host)]
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self.runner is not None:
            await self.runner.close()
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.close)

    def _start_consumer(self) -> None:
        from celery.worker import WorkController

        ready = threading.Event()

        class _Worker(WorkController):  # type: ignore[misc]
            def on_consumer_ready(self, consumer: Any) -> None:
                if self.hub is not None:  # wake the event hub often enough to notice a stop
                    self.hub.call_repeatedly(0.2, lambda: None)
                ready.set()

        from kombu.asynchronous import set_event_loop

        set_event_loop(None)  # a fresh event hub: an earlier embedded worker's is closed
        self.celery.finalize()
        # Celery's thread pool looks tasks up on the process's default app.
        self.celery.set_default()
        self.celery.set_current()
        self._worker = _Worker(
            app=self.celery,
            hostname=f"conveyor-{self.worker_id}@{os.uname().nodename}",
            pool="threads",
            concurrency=self.settings.concurrency,
            queues=[self.settings.celery_queue],
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel=logging.WARNING,
        )
        self._worker_thread = threading.Thread(
            target=self._worker.start, name="conveyor-celery-worker", daemon=True
        )
        self._worker_thread.start()
        if not ready.wait(30):
            broker = self.celery.conf.broker_url
            raise ConfigurationError(f"the Celery worker could not reach {broker}")

    def _stop_consumer(self) -> None:
        from celery.worker import state

        state.should_stop = 0
        assert self._worker_thread is not None
        self._worker_thread.join(30)
        state.should_stop = None
        self._worker_thread = None

    # the engine protocol -----------------------------------------------------------------------

    @property
    def consuming(self) -> bool:
        """This runtime runs its own (embedded) Celery worker."""
        return self._consume

    @property
    def stopping(self) -> bool:
        return self._stopping

    def submitted(self, record: TaskRecord, *, retried: bool = False) -> None:
        """A task was committed (or re-queued by an explicit retry): send its message now if it
        is due (the store marked it published); a delayed one waits for the sweeper."""
        if retried or record.run_at <= record.created_at:
            if self._publisher is not None:
                self._publisher.send(record.id, record.name, record.priority)

    def submitted_batch(self, tasks: NewTasks, ids: Sequence[str]) -> None:
        """A batch's tasks were committed: their messages, now if they are due."""
        if tasks.run_at <= tasks.created_at and self._publisher is not None:
            for task_id in ids:
                self._publisher.send(task_id, tasks.name, tasks.priority)

    def cancel_local(self, task_id: str) -> bool:
        return self.runner.cancel_local(task_id) if self.runner is not None else False

    @property
    def abandoned_threads(self) -> int:
        return self.runner.threads.abandoned_total if self.runner is not None else 0

    def publish_failed(self, task_id: str) -> None:
        """From the publisher thread: let the sweeper send it again soon."""
        asyncio.run_coroutine_threadsafe(self._unpublish(task_id), self.loop)

    async def _unpublish(self, task_id: str) -> None:
        try:
            await self.ledger.mark_unpublished(task_id)
        except ConveyorError as exc:
            logger.warning("task %s waits for the stale-message sweep: %s", task_id, exc)

    # running one message -----------------------------------------------------------------------

    def handle(self, name: str, task_id: str) -> bool:
        """From a thread other than the loop's (a pool process's main thread): :meth:`run_message`
        on the loop, waited for. The answer comes back through a ``SimpleQueue``, which costs less
        per message than ``run_coroutine_threadsafe``'s future (a condition and a lock)."""
        answer: queue.SimpleQueue[bool | BaseException] = queue.SimpleQueue()

        def reply(task: asyncio.Task[bool]) -> None:
            if task.cancelled():
                answer.put(asyncio.CancelledError())
            else:
                answer.put(task.exception() or task.result())

        def start() -> None:
            self.loop.create_task(self.run_message(name, task_id)).add_done_callback(reply)

        self.loop.call_soon_threadsafe(start)
        outcome = answer.get()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def run_message(self, name: str, task_id: str) -> bool:
        """Claim and run the task a message names; False to hand the message back to the broker
        (this runtime is stopping, or the store cannot be reached)."""
        if self._stopping or self.runner is None:
            return False
        task_type = self.host.task_types.get(name)
        if task_type is None:
            logger.error("no task type %r in this worker: message for %s dropped", name, task_id)
            return True
        limit = task_type.options.concurrency
        self._claiming += 1  # stop() lets a claim in flight finish before it drains
        try:
            record = await self.ledger.claim_one(
                task_id,
                name=name,
                worker_id=self.worker_id,
                limit=self.runner.limits({name: limit})[name] if limit else None,
                lease_s=self.settings.lease_s,
                rate=task_type.options.rate,
            )
        except ConveyorError as exc:  # the store is down: hand the message back, slowly
            logger.error("cannot claim task %s: %s", task_id, exc)
            await asyncio.sleep(1.0)
            return False
        finally:
            self._claiming -= 1
        if record is None:
            logger.debug("message for task %s dropped: not claimable", task_id)
            return True
        self.runner.launch(record)  # a task of its own: cancelling this wait leaves it running
        await self.runner.executed(record.id)
        return True

    def _settled(self, record: TaskRecord) -> None:
        if record.name in self._limits:  # its type has room again: send what waits for it
            self._wake.set()

    # sweeping ----------------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        recover_every = recovery_interval_s(self.settings.lease_s)
        recovered_at = time.monotonic()
        stale_every = self.settings.republish_after_s / 4
        stale_checked_at = float("-inf")  # first, what an earlier run may have left unsent
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.sweep_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if time.monotonic() - recovered_at >= recover_every:
                    recovered_at = time.monotonic()
                    await recover(self.host)
                stale = time.monotonic() - stale_checked_at >= stale_every
                if stale:
                    stale_checked_at = time.monotonic()
                await self._publish_due(stale=stale)
            except Exception:  # the sweeper must outlive any one failure
                logger.exception("sweep failed")

    async def _publish_due(self, *, stale: bool) -> None:
        """Send the messages of due tasks that have none; with ``stale``, also re-send those
        whose message is older than ``republish_after_s`` (lost with the broker)."""
        try:
            due = await self.ledger.due_for_publish(
                stale_s=self.settings.republish_after_s if stale else None,
                limits=self._limits,
                rates=self._rates,
            )
        except ConveyorError as exc:
            logger.error("sweep failed: %s", exc)
            return
        assert self._publisher is not None
        for task_id, name, priority in due:
            if name in self.celery.tasks:
                self._publisher.send(task_id, name, priority)
