"""The Celery engine: the same task types, run by Celery workers on any number of machines.

The PostgreSQL store stays the truth; the broker only carries "run task <id>" messages.

* **Submit**: the API commits the task, then publishes one message (JSON, the task id) named
  after the task type, from a publisher thread so the event loop never waits for the broker.
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
  stops a task whose cancel was requested (seen at once through the store's notifications).
* **Acknowledgement**: late (``acks_late``), and a message whose worker process died is
  rejected back to the queue; its redelivery finds the task still leased to the dead worker and
  is dropped, and lease recovery re-queues it only while attempts remain. A task that kills its
  worker therefore runs at most ``max_attempts`` times.

Processes: ``conveyor worker`` (or ``celery -A <module>:<celery app> worker``) runs a prefork
pool; each pool process starts its own runtime (event loop thread, store connections, runner,
sweeper) after the fork. ``Conveyor(run_workers=True)`` with this engine runs an embedded Celery
worker (thread pool) inside the app instead, with ``settings.concurrency`` threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.exceptions import Reject
from celery.worker.consumer import Consumer

from ..errors import ConfigurationError, ConveyorError
from ..record import TaskRecord
from .runner import Runner, new_worker_id, recover, recovery_interval_s

if TYPE_CHECKING:
    from ..core import Conveyor
    from ..store.postgres import PostgresStore

logger = logging.getLogger("conveyor.engine")

# Conveyor priorities (any integer, higher first) map onto 10 broker levels.
PRIORITY_LEVELS = 10
_RUNTIMES: dict[int, CeleryEngine] = {}
_RUNTIMES_LOCK = threading.Lock()


def broker_priority(priority: int, broker_url: str) -> int:
    """The broker's priority for a Conveyor priority: RabbitMQ runs higher numbers first,
    Redis (kombu's priority lists) lower ones."""
    level = min(max(priority, 0), PRIORITY_LEVELS - 1)
    return level if broker_url.startswith("amqp") else PRIORITY_LEVELS - 1 - level


def build_celery_app(yard: Conveyor) -> Celery:
    """A Celery app whose tasks are ``yard``'s task types (one Celery task per type)."""
    settings = yard.settings
    if settings.engine != "celery":
        raise ConfigurationError("the Celery app needs CONVEYOR_ENGINE=celery")
    app = Celery("conveyor", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.celery_queue,
        task_queue_max_priority=PRIORITY_LEVELS - 1,
        task_default_priority=broker_priority(0, settings.broker_url or ""),
        broker_transport_options={
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer=f"{__name__}:BrokerLossConsumer",
    )
    for name in yard.task_types:
        app.task(name=name, shared=False, acks_late=True, reject_on_worker_lost=True)(
            _message_handler(yard, name)
        )
    return app


class BrokerLossConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, alive after its broker connection drops with messages unacknowledged.

    With Redis, Celery 5.7 and kombu 5.7 raise ``AttributeError`` (the lost connection's
    transport has no connection info left) in two places, and the worker then exits with
    "Unrecoverable error" (seen when Redis restarts mid-batch):

    * closing the lost connection's channel, which tries to give its unacknowledged messages
      back through that transport;
    * acknowledging, after the reconnection, a task that ran while the connection was lost.

    Both are taken as the connection errors they are: the consumer reconnects, and an
    acknowledgement that cannot be sent is logged and dropped. The messages concerned are lost
    with the connection; the store re-sends what they carried and drops what already ran.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # given to each request too (Celery's ``ack_log_error`` logs these and carries on)
        errors: tuple[type[BaseException], ...] = self.conninfo.connection_errors
        self.connection_errors = (*errors, AttributeError)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            logger.warning("closing the lost broker connection failed (%r); reconnecting", error)


def _message_handler(yard: Conveyor, name: str) -> Any:
    def run(task_id: str) -> None:
        if not isinstance(task_id, str) or len(task_id) > 100:
            logger.error("dropped a malformed %s message: %r", name, task_id)
            return
        if not runtime_for(yard).handle(name, task_id):  # another worker, or this one later
            raise Reject("cannot run the task now", requeue=True)

    run.__name__ = name.rpartition(".")[2] or "run"
    return run


def runtime_for(yard: Conveyor) -> CeleryEngine:
    """This process's runtime for ``yard``: the embedded engine, or one started on first use
    (in a prefork pool process, after the fork)."""
    runtime = _RUNTIMES.get(id(yard))  # called per message: no lock once it exists
    if runtime is not None:
        return runtime
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(id(yard))
        if runtime is None:
            runtime = _start_worker_runtime(yard)
            _RUNTIMES[id(yard)] = runtime
        return runtime


def _forget_runtimes_after_fork() -> None:
    """A forked process (a prefork pool process) has none of its parent's runtimes: their loop
    threads stayed behind."""
    global _RUNTIMES_LOCK
    _RUNTIMES.clear()
    _RUNTIMES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_runtimes_after_fork)


def _start_worker_runtime(yard: Conveyor) -> CeleryEngine:
    """Start ``yard`` on an event loop in a thread of its own, to run tasks for Celery (uvloop
    when installed, as uvicorn uses: asyncpg's round trips cost less on it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="conveyor-runtime", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(yard.start_for_celery_worker(), loop).result(60)
    engine = yard.engine
    assert isinstance(engine, CeleryEngine)
    return engine


def stop_runtime(yard: Conveyor) -> None:
    """Stop this process's runtime, if it has one: the outcomes still being recorded are written
    (a message is acknowledged once its task has run, while its outcome is written behind it)."""
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(id(yard))
    # a forked process starts with none (_forget_runtimes_after_fork): any found is this one's
    if runtime is None or runtime.loop.is_closed():
        return
    if runtime.consuming or runtime.stopping:  # an embedded worker stops with its Conveyor
        return
    grace_s = yard.settings.shutdown_grace_s + 5.0
    try:
        asyncio.run_coroutine_threadsafe(yard.stop(), runtime.loop).result(grace_s)
    except Exception:
        logger.exception("Conveyor's runtime did not stop cleanly")
    runtime.loop.call_soon_threadsafe(runtime.loop.stop)


def install_worker_hooks(yard: Conveyor) -> None:
    """Start each prefork pool process's runtime as soon as it is forked (not on first task),
    and stop it (recording what it ran) when the process or the worker shuts down."""

    def on_process_init(**_: Any) -> None:
        try:
            runtime_for(yard)
        except Exception:
            logger.exception("the worker process could not start Conveyor's runtime")
            raise

    def on_ready(sender: Any = None, **_: Any) -> None:
        pool = getattr(getattr(sender, "pool", None), "__module__", "")
        if not pool.endswith("prefork"):  # solo and threads pools run tasks in this process
            runtime_for(yard)

    def on_shutdown(**_: Any) -> None:
        stop_runtime(yard)

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_process_shutdown.connect(on_shutdown, weak=False)  # in each pool process
    signals.worker_shutdown.connect(on_shutdown, weak=False)  # solo and threads pools


class _Publisher:
    """Sends task messages from a thread; a failed send clears ``published_at`` (the sweeper
    sends it again).

    What waits in the queue goes out together, in one kombu publish batch (one Redis pipeline;
    a broker without batches, such as RabbitMQ, gets each message at once): measured with Redis,
    a burst of 200 messages costs about 80 µs of CPU each this way, against 366 µs sent one by
    one (144 µs batched with Celery's defaults for each message: declare the queue, retry, and
    its own repr of the arguments)."""

    BATCH = 500  # messages taken from the queue at most per batch

    def __init__(self, engine: CeleryEngine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[tuple[str, str, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="conveyor-publish", daemon=True)
        self._thread.start()

    def send(self, task_id: str, name: str, priority: int) -> None:
        self._queue.put((task_id, name, priority))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while True:  # a broker that is down (even at start) only delays messages
            try:
                with self._engine.celery.producer_or_acquire() as producer:
                    while True:
                        batch, closing = self._take()
                        if batch:
                            self._send_batch(producer, batch)
                        if closing:
                            return
            except Exception as exc:
                logger.warning("the broker is unreachable: %s", exc)
                time.sleep(1.0)

    def _take(self) -> tuple[list[tuple[str, str, int]], bool]:
        """The messages waiting (at least one, blocking for it), and whether to stop after them."""
        batch: list[tuple[str, str, int]] = []
        item = self._queue.get()
        while item is not None:
            batch.append(item)
            if len(batch) == self.BATCH:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _send_batch(self, producer: Any, batch: list[tuple[str, str, int]]) -> None:
        # In a batch (Redis), a message only joins the pipeline: nothing to retry before the flush,
        # and no queue to declare (a message for the default exchange goes straight to the list
        # named after its queue). Without batches (RabbitMQ), Celery declares the queue, which
        # creates it when no worker has yet, and retries a failed send.
        batched = bool(producer.supports_batch_publish)
        sent: list[str] = []
        try:
            with producer.batch(max_size=len(batch)):
                for item in batch:
                    if self._send(producer, *item, batched=batched):
                        sent.append(item[0])
        except Exception as exc:  # the flush failed: any of them may be lost
            logger.warning("could not publish %d task messages: %s", len(sent), exc)
            for task_id in sent:
                self._engine.publish_failed(task_id)

    def _send(
        self, producer: Any, task_id: str, name: str, priority: int, *, batched: bool
    ) -> bool:
        settings = self._engine.settings
        try:
            self._engine.celery.send_task(
                name,
                args=[task_id],
                argsrepr=repr([task_id]),  # what Celery's saferepr would say, at a tenth the cost
                kwargsrepr="{}",
                queue=settings.celery_queue,
                priority=broker_priority(priority, settings.broker_url or ""),
                producer=producer,
                declare=[] if batched else None,
                retry=not batched,
                retry_policy={"max_retries": 2, "interval_start": 0.1},
            )
        except Exception as exc:
            logger.warning("could not publish task %s: %s", task_id, exc)
            self._engine.publish_failed(task_id)
            return False
        return True


class CeleryEngine:
    """The Celery engine in one process: publishes, sweeps, and (when asked) runs tasks.

    Args:
        yard: the started Conveyor.
        execute: this process runs tasks (holds a :class:`Runner`).
        consume: run an embedded Celery worker (thread pool) that feeds the runner; False in a
            Celery pool process, where Celery calls the task handlers itself.
    """

    def __init__(self, yard: Conveyor, *, execute: bool, consume: bool) -> None:
        self.yard = yard
        self.settings = yard.settings
        self.worker_id = new_worker_id()
        self.celery = yard.celery_app()
        self._execute = execute
        self._consume = consume and execute
        self._stopping = False
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._publisher: _Publisher | None = None
        self._worker: Any = None
        self._worker_thread: threading.Thread | None = None
        self.runner: Runner | None = None
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        types = yard.task_types
        self._limits = {n: t.options.concurrency for n, t in types.items() if t.options.concurrency}
        if execute:
            self.runner = Runner(
                yard,
                worker_id=self.worker_id,
                threads=self.settings.concurrency,
                process_workers=self.settings.process_workers if consume else 1,
                on_settled=self._settled,
            )

    @property
    def store(self) -> PostgresStore:
        from ..store.postgres import PostgresStore

        store = self.yard.store
        if not isinstance(store, PostgresStore):
            raise ConfigurationError("the celery engine needs the PostgreSQL store")
        return store

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._publisher = _Publisher(self)
        await recover(self.yard)
        self._loops = [asyncio.create_task(self._sweep_loop(), name="conveyor-sweep")]
        if self.runner is not None:
            self.runner.bind()
            if self._consume:  # a pool process runs one task at a time: its child comes on use
                await self.runner.warm()
            self._loops.append(
                asyncio.create_task(self.runner.heartbeat_loop(), name="conveyor-heartbeat")
            )
        if self._consume:
            with _RUNTIMES_LOCK:
                _RUNTIMES[id(self.yard)] = self
            await asyncio.to_thread(self._start_consumer)
        logger.info(
            "celery engine %s started (%s)",
            self.worker_id,
            "embedded worker" if self._consume else "worker" if self._execute else "publisher",
        )

    async def stop(self, grace_s: float) -> None:
        self._stopping = True
        if self.runner is not None:
            await self.runner.drain(grace_s)
        if self._worker_thread is not None:
            await asyncio.to_thread(self._stop_consumer)
        with _RUNTIMES_LOCK:
            if _RUNTIMES.get(id(self.yard)) is self:
                del _RUNTIMES[id(self.yard)]
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

    def wake(self) -> None:
        self._wake.set()

    def submitted(self, record: TaskRecord, *, retried: bool = False) -> None:
        """A task was committed (or re-queued by an explicit retry): send its message now if it
        is due (the store marked it published); a delayed one waits for the sweeper."""
        if retried or record.run_at <= record.created_at:
            if self._publisher is not None:
                self._publisher.send(record.id, record.name, record.priority)

    def cancel_local(self, task_id: str) -> bool:
        return self.runner.cancel_local(task_id) if self.runner is not None else False

    def publish_failed(self, task_id: str) -> None:
        """From the publisher thread: let the sweeper send it again soon."""
        asyncio.run_coroutine_threadsafe(self._unpublish(task_id), self.loop)

    async def _unpublish(self, task_id: str) -> None:
        try:
            await self.store.mark_unpublished(task_id)
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
        task_type = self.yard.task_types.get(name)
        if task_type is None:
            logger.error("no task type %r in this worker: message for %s dropped", name, task_id)
            return True
        try:
            record = await self.store.claim_one(
                task_id,
                name=name,
                worker_id=self.worker_id,
                limit=task_type.options.concurrency,
                lease_s=self.settings.lease_s,
            )
        except ConveyorError as exc:  # the store is down: hand the message back, slowly
            logger.error("cannot claim task %s: %s", task_id, exc)
            await asyncio.sleep(1.0)
            return False
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
                    await recover(self.yard)
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
            due = await self.store.due_for_publish(
                stale_s=self.settings.republish_after_s if stale else None, limits=self._limits
            )
        except ConveyorError as exc:
            logger.error("sweep failed: %s", exc)
            return
        assert self._publisher is not None
        for task_id, name, priority in due:
            if name in self.celery.tasks:
                self._publisher.send(task_id, name, priority)
