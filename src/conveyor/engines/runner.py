"""Running claimed tasks: one attempt from claim to recorded outcome, shared by every engine.

An engine decides *which* tasks this process runs (the local dispatcher claims batches from the
store; a Celery worker claims the task its message names) and hands each claimed record to a
``Runner``. The runner executes it (coroutines on the loop, sync functions in a thread pool,
CPU-bound ones in a child process), enforces its timeout, reports progress, renews the leases of
what it holds, stops a task whose cancel was requested, and records the outcome guarded by the
claim token, so a stale worker's write is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import serialization, tasklogs
from ..backoff import retry_delay_s
from ..blobs import encode_result
from ..context import TaskContext
from ..errors import ConveyorError, TaskCancelled
from ..record import TaskRecord, WorkerRecord
from ..schedule_record import scheduled_for
from ..status import TaskStatus
from ..store.rows import WORKER_LOST
from ..tally import BY_MINUTE
from ..task import TaskType
from .base import EngineHost
from .processes import ChildTaskError, ProcessPool, error_message
from .progress import ProgressWriter
from .threads import TaskThreads

logger = logging.getLogger("conveyor.engine")

_MAX_TRACEBACK = 64_000
_STARTED_LATE_S = 0.05  # a process task that waited longer for a child gets its started_at anew


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def recovery_interval_s(lease_s: float) -> float:
    """How often expired leases are looked for; a dead worker's task waits at most
    ``lease_s + recovery_interval_s(lease_s)`` before it is re-queued or failed."""
    return min(max(lease_s / 4, 0.25), 5.0)


async def recover(host: EngineHost) -> bool:
    """Recover the tasks whose lease expired; whether any was put back in the queue."""
    try:
        recovered = await host.store.recover_expired()
    except ConveyorError as exc:
        logger.error("recovery failed: %s", exc)
        return False
    for record in recovered:
        logger.warning(
            "recovered task %s (%s) from a lost worker: now %s",
            record.id,
            record.name,
            record.status.value,
        )
        host.notify(record.id)
    return bool(recovered)


def heartbeat_interval_s(lease_s: float) -> float:
    return min(lease_s / 3, 1.0)


def error_info(exc: BaseException, *, type_name: str | None = None) -> dict[str, Any]:
    """``{type, message, traceback}`` for a task's ``error``."""
    tb = "".join(traceback.format_exception(exc))
    return {
        "type": type_name or type(exc).__name__,
        "message": error_message(exc),
        "traceback": tb[-_MAX_TRACEBACK:],
    }


@dataclass(slots=True)
class _Running:
    record: TaskRecord
    task_type: TaskType[Any, Any]
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False
    task: asyncio.Task[None] | None = None
    progress: ProgressWriter | None = None
    executed: asyncio.Event = field(default_factory=asyncio.Event)
    log: tasklogs.TaskLog | None = None
    began: float = 0.0  # monotonic, when this attempt began


class Runner:
    """Executes claimed tasks in this process and records their outcomes in the store.

    Args:
        host: the instance whose task types, store and blobs are used.
        worker_id: the claim token's owner (the id the store leases tasks to).
        threads: threads kept for sync tasks between tasks (more start when all are busy).
        process_workers: children for ``executor="process"`` tasks.
        on_settled: called (on the loop) each time a task leaves this runner, or is put back in
            the queue for a retry.
    """

    def __init__(
        self,
        host: EngineHost,
        *,
        worker_id: str,
        threads: int,
        process_workers: int,
        on_settled: Callable[[TaskRecord], None] = lambda record: None,
    ) -> None:
        self.host = host
        self.settings = host.settings
        self.worker_id = worker_id
        self.running: dict[str, _Running] = {}
        self._on_settled = on_settled
        self._draining = False
        self._background: set[asyncio.Task[Any]] = set()
        self.threads = TaskThreads(keep_idle=threads)
        self._processes = ProcessPool(process_workers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._me: WorkerRecord | None = None
        tasklogs.install()
        self.concurrency = self.settings.concurrency  # what this worker runs at once

    def bind(self) -> None:
        """Attach to the running event loop (call from it before ``launch``)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    async def warm(self) -> None:
        """Start the worker processes now if some task type needs them."""
        if self.settings.process_warmup and any(
            t.options.executor == "process" for t in self.host.task_types.values()
        ):
            await self._processes.warm()

    def launch(self, record: TaskRecord) -> asyncio.Task[None]:
        """Run a claimed record; the returned task ends once its outcome is recorded."""
        run = _Running(record, self.host.task_types[record.name])
        run.progress = ProgressWriter(
            functools.partial(self._write_progress, record), self._spawn_background
        )
        self.running[record.id] = run
        run.task = asyncio.create_task(self._execute(run), name=f"conveyor:{record.id}")
        self.host.notify(record.id)
        return run.task

    async def executed(self, task_id: str) -> None:
        """Wait until the task's function has returned or raised (its outcome may still be
        being recorded)."""
        run = self.running.get(task_id)
        if run is not None:
            await run.executed.wait()

    def limits(self, limits: dict[str, int]) -> dict[str, int]:
        """Per-type limits less the bodies of that type still running on abandoned threads."""
        abandoned = self.threads.abandoned
        if not abandoned:
            return limits
        return {name: limit - abandoned.get(name, 0) for name, limit in limits.items()}

    def cancel_local(self, task_id: str) -> bool:
        run = self.running.get(task_id)
        if run is None or run.cancel_requested:
            return run is not None
        run.cancel_requested = True
        run.cancel_event.set()
        if run.task is not None and run.task_type.options.executor != "thread":
            run.task.cancel()  # threads stop cooperatively through ctx.cancelled
        return True

    async def register(self) -> None:
        """Insert or renew this worker's row in the store (at start, then every heartbeat)."""
        if self._me is None:
            self._me = WorkerRecord(
                id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                engine=self.settings.engine,
                concurrency=self.concurrency,
                task_types=sorted(self.host.task_types),
                started_at=time.time(),
            )
        self._me.running = len(self.running)
        await self.host.store.workers().beat(self._me, lease_s=self.settings.lease_s)

    async def heartbeat_loop(self) -> None:
        """Renew this worker's row and the leases of the tasks held here; stop those whose
        cancel was requested. The worker's row is deleted when the loop is cancelled (a stop)."""
        interval = heartbeat_interval_s(self.settings.lease_s)
        workers = self.host.store.workers()
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.register()
                except ConveyorError as exc:
                    logger.error("worker heartbeat failed: %s", exc)
                for run in list(self.running.values()):
                    await self._write_log(run)
                if not self.running:
                    continue
                try:  # only what this runner holds: a task it let go of is left to expire
                    for task_id in await self.host.store.heartbeat(
                        self.worker_id, list(self.running), self.settings.lease_s
                    ):
                        self.cancel_local(task_id)
                except ConveyorError as exc:
                    logger.error("heartbeat failed: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await workers.gone(self.worker_id)

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for running tasks, then put the rest back in the queue."""
        tasks = [run.task for run in self.running.values() if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        left = list(self.running.values())
        if not left:
            return
        self._draining = True
        logger.warning("re-queueing %d task(s) still running at shutdown", len(left))
        for run in left:
            try:
                await self.host.store.requeue(
                    run.record.id,
                    self.worker_id,
                    run.record.attempts,
                    delay_s=0.0,
                    error=run.record.error,
                    refund_attempt=True,
                )
            except ConveyorError as exc:  # its lease expires and recovery re-queues it
                logger.error("could not re-queue task %s: %s", run.record.id, exc)
            run.cancel_event.set()
            if run.task is not None:
                run.task.cancel()  # a thread keeps running; its late outcome is dropped
        pending = [run.task for run in left if run.task is not None]
        await asyncio.wait(pending, timeout=1.0)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
            for leftover in list(self._background):
                leftover.cancel()
        self.threads.close()
        await self._processes.close()

    # one attempt -------------------------------------------------------------------------------

    async def _execute(self, run: _Running) -> None:
        record = run.record
        try:
            await self._attempt(run)
        except asyncio.CancelledError:
            if not self._draining:
                raise
        except Exception:
            # The store failed while recording. This runner lets go of the task: its lease is no
            # longer renewed, so recovery re-queues (or fails) it within the documented bound.
            logger.exception("could not record the outcome of task %s", record.id)
        finally:
            run.executed.set()
            if run.progress is not None:
                run.progress.close()
            self.running.pop(record.id, None)
            self._on_settled(record)
            self.host.notify(record.id)

    async def _attempt(self, run: _Running) -> None:
        record, task_type = run.record, run.task_type
        run.began = time.monotonic()
        # this attempt's own context (its asyncio task's): what it logs is the task's
        run.log = tasklogs.TaskLog(record.id, record.name, record.attempts, self.worker_id)
        tasklogs.CURRENT.set(run.log)
        if (record.error or {}).get("type") == WORKER_LOST["type"]:  # the attempts' history
            run.log.add("WARNING", f"attempt {record.attempts - 1} was lost with its worker")
        ctx = TaskContext(
            task_id=record.id,
            name=record.name,
            attempt=record.attempts,
            max_attempts=record.max_attempts,
            reporter=functools.partial(self._report_progress, run),
            cancel_event=run.cancel_event,
            blobs=self.host.blobs,
            scheduled_for=scheduled_for(record.idempotency_key),
            batch_id=record.batch_id,
        )
        # A process task's timeout starts once a child is its own (see _call), not while it
        # waits for one.
        in_child = task_type.options.executor == "process"
        timeout = asyncio.timeout(None if in_child else record.timeout_s)
        try:
            async with timeout:
                try:
                    result_json, blob_json = await self._call(run, ctx, timeout)
                finally:
                    run.executed.set()
                    await self._write_log(run)  # before the outcome: a client that sees
                    # the task end finds its lines
        except asyncio.CancelledError as exc:
            if self._draining:
                raise
            if run.cancel_requested:
                await self._finish(run, TaskStatus.CANCELLED)
                return
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this attempt itself is being cancelled (the engine is stopping)
            # raised by the task's own code (it cancelled and awaited a helper of its own)
            await self._retry_or_fail(
                run, error_info(exc), retryable=isinstance(exc, task_type.options.retry_on)
            )
        except TimeoutError as exc:
            run.cancel_event.set()  # lets a sync task notice it should stop
            if timeout.expired():
                error = {
                    "type": "TimeoutError",
                    "message": f"task timed out after {record.timeout_s:g} s",
                    "traceback": None,
                }
            else:
                error = error_info(exc)
            await self._retry_or_fail(
                run, error, retryable=isinstance(exc, task_type.options.retry_on)
            )
        except TaskCancelled:
            await self._finish(run, TaskStatus.CANCELLED)
        except ChildTaskError as exc:
            error = {"type": exc.type_name, "message": exc.message, "traceback": exc.traceback}
            await self._retry_or_fail(run, error, retryable=exc.matches(task_type.options.retry_on))
        except serialization.JSONError as exc:
            error = {"type": "TypeError", "message": f"the result is {exc}", "traceback": None}
            await self._finish(run, TaskStatus.FAILED, error=error)
        except Exception as exc:
            if self._draining:
                return
            retryable = isinstance(exc, task_type.options.retry_on)
            await self._retry_or_fail(run, error_info(exc), retryable=retryable)
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: the task's, not the worker's
            if self._draining:
                return
            retryable = isinstance(exc, task_type.options.retry_on)
            await self._retry_or_fail(run, error_info(exc), retryable=retryable)
        else:
            if self._draining:
                return
            await self._finish(
                run, TaskStatus.COMPLETED, result_json=result_json, blob_json=blob_json
            )

    async def _call(
        self, run: _Running, ctx: TaskContext, timeout: asyncio.Timeout
    ) -> tuple[str, str | None]:
        task_type, record = run.task_type, run.record
        executor = task_type.options.executor
        if executor == "process":
            claimed_at = time.monotonic()

            def started() -> None:
                if record.timeout_s is not None:
                    timeout.reschedule(asyncio.get_running_loop().time() + record.timeout_s)
                if time.monotonic() - claimed_at > _STARTED_LATE_S:  # it waited for a child
                    self._spawn_background(self._mark_started(record))

            return await self._processes.run(
                task_type.module,
                task_type.qualname,
                record.args,
                task=(
                    record.id,
                    record.name,
                    record.attempts,
                    record.max_attempts,
                    scheduled_for(record.idempotency_key),
                    record.batch_id,
                ),
                blob_root=str(self.host.blobs.root),
                on_progress=functools.partial(self._report_progress, run),
                on_start=started,
                on_log=run.log.add if run.log is not None else lambda *line: None,
            )
        kwargs = task_type.call_kwargs(record.args)
        fn = task_type.fn
        if executor == "async":
            value = await (fn(ctx, **kwargs) if task_type.takes_context else fn(**kwargs))
        else:
            call = (
                functools.partial(fn, ctx, **kwargs)
                if task_type.takes_context
                else (functools.partial(fn, **kwargs))
            )
            in_context = functools.partial(contextvars.copy_context().run, call)
            value = await self.threads.run(in_context, type_name=task_type.name)
        return encode_result(value)

    async def _write_log(self, run: _Running) -> None:
        """Write the lines the task logged since the last write (never raises: a log that
        cannot be written is not the task's failure)."""
        lines = run.log.take() if run.log is not None else []
        if not lines:
            return
        try:
            await self.host.store.logs().append(run.record.id, lines)
        except Exception as exc:
            logger.warning("the log lines of task %s are lost: %s", run.record.id, exc)

    async def _finish(
        self,
        run: _Running,
        status: TaskStatus,
        *,
        result_json: str | None = None,
        blob_json: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        record = run.record
        recorded = await self.host.store.finish(
            record.id,
            self.worker_id,
            record.attempts,
            status=status,
            result_json=result_json,
            blob_json=blob_json,
            error=error,
        )
        if not recorded:
            logger.warning("task %s was taken from this worker; its outcome is dropped", record.id)
            return
        self._ran(run)
        tally = self.host.tally
        tally.count("conveyor_tasks_finished", {"task": record.name, "outcome": status.value})
        tally.per_minute(BY_MINUTE, {"owner": record.owner, "outcome": status.value}, time.time())
        if status is TaskStatus.FAILED:
            logger.error(
                "task %s (%s) failed: %s: %s",
                record.id,
                record.name,
                (error or {}).get("type"),
                (error or {}).get("message"),
            )

    async def _retry_or_fail(
        self, run: _Running, error: dict[str, Any], *, retryable: bool
    ) -> None:
        record, options = run.record, run.task_type.options
        if retryable and run.cancel_requested:  # a cancel request wins over a retry
            await self._finish(run, TaskStatus.CANCELLED)
            return
        if retryable and record.attempts < record.max_attempts:
            base_s = (
                options.backoff_base_s
                if options.backoff_base_s is not None
                else self.settings.retry_base_s
            )
            delay = retry_delay_s(record.attempts, base_s=base_s, max_s=self.settings.retry_max_s)
            logger.info(
                "task %s attempt %d failed (%s); retrying in %.2f s",
                record.id,
                record.attempts,
                error["type"],
                delay,
            )
            await self._attempt_ended(run, error, f"the next in {delay:.2f} s")
            requeued = await self.host.store.requeue(
                record.id,
                self.worker_id,
                record.attempts,
                delay_s=delay,
                error=error,
                refund_attempt=False,
            )
            if requeued is not None and requeued.status is TaskStatus.CANCELLED:
                logger.info("task %s was cancelled before its retry", record.id)
            elif requeued is not None:
                self._ran(run)
                self.host.tally.count("conveyor_task_retries", {"task": record.name})
            return
        if record.attempts > 1:
            await self._attempt_ended(run, error, "no attempt left")
        await self._finish(run, TaskStatus.FAILED, error=error)

    async def _attempt_ended(self, run: _Running, error: dict[str, Any], then: str) -> None:
        """One line of the attempts' history with the task's log lines, for an attempt that
        failed when there were or are others (a first and only attempt's facts are the task's
        own): its number, worker, time and error. Written only on this path: a task that
        succeeds the first time writes nothing more."""
        record = run.record
        if run.log is None:
            return
        run.log.add(
            "WARNING",
            f"attempt {record.attempts} of {record.max_attempts} on worker {self.worker_id} "
            f"failed after {time.monotonic() - run.began:.2f} s "
            f"({error.get('type')}: {error.get('message')}); {then}",
        )
        await self._write_log(run)

    def _ran(self, run: _Running) -> None:
        """Count an ended attempt's time, and how long its task waited to start (both on the
        store's clock)."""
        record, labels = run.record, {"task": run.record.name}
        self.host.tally.observe("conveyor_task_run_seconds", labels, time.monotonic() - run.began)
        if record.started_at is not None:
            waited = record.started_at - max(record.run_at, record.created_at)
            self.host.tally.observe("conveyor_task_queue_wait_seconds", labels, max(waited, 0.0))

    # progress ----------------------------------------------------------------------------------

    def _report_progress(
        self, run: _Running, percent: float, message: str | None
    ) -> asyncio.Future[None] | None:
        assert self._loop is not None and run.progress is not None
        if threading.get_ident() == self._loop_thread:
            return run.progress.report(percent, message)
        self._loop.call_soon_threadsafe(run.progress.report, percent, message)
        return None

    def _spawn_background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mark_started(self, record: TaskRecord) -> None:
        try:
            await self.host.store.mark_started(record.id, self.worker_id, record.attempts)
        except ConveyorError as exc:
            logger.warning("start time of task %s not stored: %s", record.id, exc)
            return
        self.host.notify(record.id)

    async def _write_progress(
        self, record: TaskRecord, percent: float, message: str | None
    ) -> None:
        try:
            await self.host.store.set_progress(
                record.id, self.worker_id, record.attempts, percent, message
            )
        except ConveyorError as exc:
            logger.warning("progress of task %s not stored: %s", record.id, exc)
            return
        self.host.notify(record.id)
