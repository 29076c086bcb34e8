"""``Conveyor``: the task registry, submission, waiting, and the lifecycle of store and engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from .batch_record import BatchRecord
from .batches import Batches
from .blobs import BlobStore
from .context import TaskContext
from .engines import Engine, open_engine
from .errors import (
    ConfigurationError,
    InvalidArguments,
    NotStarted,
    TaskTypeError,
    UnknownTaskType,
    WaitTimeout,
)
from .rates import parse_rate
from .record import TaskRecord, reserved_key_problem
from .retention import Retention
from .scheduler import Scheduler, Schedules
from .settings import Settings
from .status import TaskStatus
from .store import Store, open_store
from .store.rows import NO_FILTER, TaskFilter
from .tally import Flusher, Tally
from .task import UNSET, Executor, TaskOptions, TaskType, new_record, new_records
from .watching import Watchers

if TYPE_CHECKING:
    from celery import Celery
    from fastapi import APIRouter, FastAPI

    from .dashboard.sections import Section

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("conveyor")


class _TaskDecorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]], /
    ) -> TaskType[P, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[TaskContext, P], R], /) -> TaskType[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> TaskType[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> TaskType[P, R]: ...


class Conveyor:
    """A task system: register task types, then submit, watch and manage tasks.

    Example:
        ```python
        yard = Conveyor(Settings())

        @yard.task(timeout_s=30, retries=3)
        async def process_data(ctx: TaskContext, data: str) -> str:
            await ctx.progress(50, "half way")
            return f"Processed: {data}"

        app = FastAPI(lifespan=yard.lifespan)
        app.include_router(yard.router())
        ```

    Args:
        settings: typed settings (defaults to ``Settings()``; read from the environment only if
            the caller builds it so).
        run_workers: run engine workers in this process (False: submit and serve only).
    """

    def __init__(self, settings: Settings | None = None, *, run_workers: bool = True) -> None:
        self.settings = settings if settings is not None else Settings()
        self.run_workers = run_workers
        self.task_types: dict[str, TaskType[Any, Any]] = {}
        self._store: Store | None = None
        self._engine: Engine | None = None
        self._watchers = Watchers(
            self.settings.poll_s, lambda changed: self.store.subscribe(changed)
        )
        self.blobs = BlobStore(Path(self.settings.data_dir) / "blobs")
        self._started = False
        self._celery: Celery | None = None
        self.schedules = Schedules(self)
        self.batches = Batches(self)
        self._scheduler: Scheduler | None = None
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self.retention = Retention(self)
        self.tally = Tally()  # what this process did, for /metrics
        self._flusher: Flusher | None = None
        #: the ready services' dashboard pages (``dashboard/sections.py``)
        self.dashboard_sections: list[Section] = []

    # registry ----------------------------------------------------------------------------------

    def task(
        self,
        *,
        name: str | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        backoff_base_s: float | None = None,
        concurrency: int | None = None,
        rate: str | None = None,
        priority: int = 0,
        executor: Executor | None = None,
        idempotent: bool = False,
        public: bool = True,
    ) -> _TaskDecorator:
        """Register a function as a task type.

        Args:
            name: defaults to ``module.function``.
            timeout_s: per attempt; ``None`` is no limit. A timeout fails with ``TimeoutError``.
            retries: extra attempts after a failure whose exception is in ``retry_on``.
            backoff_base_s: first retry delay (doubles per attempt, with jitter).
            concurrency: at most this many of this type run at once, across all workers.
            rate: at most this many starts per unit of time, across all workers (``"20/s"``,
                ``"100/m"``, ``"1000/h"``); a task held back stays queued.
            priority: default priority (higher runs first).
            executor: ``async`` (coroutines), ``thread`` (sync functions), or ``process``
                (CPU-bound, run in a child process); inferred from the function by default.
            idempotent: the function is safe to run twice (documented; recovery always re-runs).
            public: submittable through ``POST /tasks``; ready services register internal
                types (``public=False``) that only their own routes submit.
        """
        if retries < 0 or (timeout_s is not None and timeout_s <= 0):
            raise TaskTypeError("retries must be ≥ 0 and timeout_s > 0")
        if concurrency is not None and concurrency < 1:
            raise TaskTypeError("concurrency must be ≥ 1")
        parsed_rate = None if rate is None else parse_rate(rate)

        def register(fn: Callable[..., Any]) -> TaskType[Any, Any]:
            task_name = name or f"{fn.__module__}.{fn.__qualname__}"
            if task_name in self.task_types:
                raise TaskTypeError(f"a task type named {task_name!r} is already registered")
            chosen = executor or ("async" if asyncio.iscoroutinefunction(fn) else "thread")
            if chosen == "async" and not asyncio.iscoroutinefunction(fn):
                raise TaskTypeError(f"task {task_name!r}: executor='async' needs an async def")
            options = TaskOptions(
                timeout_s=timeout_s,
                retries=retries,
                retry_on=retry_on,
                backoff_base_s=backoff_base_s,
                concurrency=concurrency,
                rate=parsed_rate,
                priority=priority,
                executor=chosen,
                idempotent=idempotent,
                public=public,
            )
            task_type: TaskType[Any, Any] = TaskType(
                fn, name=task_name, options=options, submitter=self
            )
            self.task_types[task_name] = task_type
            return task_type

        return register

    def periodic(
        self,
        *,
        cron: str | None = None,
        every_s: float | None = None,
        timezone: str = "UTC",
        args: Mapping[str, Any] | None = None,
        name: str | None = None,
        **options: Any,
    ) -> Callable[[TaskType[P, R]], TaskType[P, R]]:
        """Run a task type on a schedule: ``@yard.periodic(cron="*/5 * * * *")`` above
        ``@yard.task(...)``. Exactly one task per planned fire, whatever the number of
        processes; saved by name at start (a schedule no longer declared is disabled, its
        history kept). ``options``: ``start_at``, ``end_at`` (epoch seconds), ``jitter_s``,
        ``misfire`` (``skip`` | ``run_once``), ``max_lateness_s``, ``overlap`` (``allow`` |
        ``skip_if_running``), ``enabled``. The task reads its planned time as
        ``ctx.scheduled_for``."""

        def declare(task_type: TaskType[P, R]) -> TaskType[P, R]:
            self.schedule(
                task_type.name,
                cron=cron,
                every_s=every_s,
                timezone=timezone,
                args=args,
                name=name,
                **options,
            )
            return task_type

        return declare

    def schedule(
        self,
        task: str,
        *,
        cron: str | None = None,
        every_s: float | None = None,
        timezone: str = "UTC",
        args: Mapping[str, Any] | None = None,
        name: str | None = None,
        **options: Any,
    ) -> None:
        """Declare a schedule of the task type named ``task`` (see :meth:`periodic`)."""
        self.schedules.declare(
            task,
            name=name,
            args=dict(args or {}),
            cron=cron,
            every_s=every_s,
            timezone=timezone,
            **options,
        )

    def task_type(self, name: str, *, public_only: bool = False) -> TaskType[Any, Any]:
        """The task type named ``name``; ``public_only`` hides internal ones (``public=False``)."""
        try:
            task_type = self.task_types[name]
            if public_only and not task_type.options.public:
                raise KeyError(name)
            return task_type
        except KeyError:
            raise UnknownTaskType(
                f"no task type named {name!r}",
                details=[
                    {"loc": ["name"], "msg": f"unknown task type {name!r}", "type": "unknown_task"}
                ],
            ) from None

    # lifecycle ---------------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            raise NotStarted("Conveyor is not started: use `async with yard:` or yard.lifespan")
        return self._store

    async def start(self) -> None:
        """Open the store and start the engine's workers (if ``run_workers``)."""
        if self._started:
            raise ConfigurationError("this Conveyor instance is already started")
        await self._start(consume=True)

    async def start_for_celery_worker(self) -> None:
        """Start inside a Celery worker process, which delivers the messages itself."""
        if self._started:
            raise ConfigurationError("this Conveyor instance is already started")
        self.run_workers = True
        await self._start(consume=False)

    async def _start(self, *, consume: bool) -> None:
        self._started = True
        try:
            store = open_store(self.settings)
            await store.open()
            self._store = store
            self._watchers.reset()
            stats = store.stats()
            self._flusher = Flusher(self.tally, stats.add_totals, prune=stats.prune)
            self._flusher.start()
            celery = self.celery_app() if self.settings.engine == "celery" else None
            engine = open_engine(self, run_workers=self.run_workers, consume=consume, celery=celery)
            if engine is not None:
                self._engine = engine
                await engine.start()
                self.retention.start()
            await self.schedules.sync_declared()
            if self.run_workers:
                self._scheduler = Scheduler(self.schedules)
                self._scheduler.start()
        except BaseException:
            await self.stop()
            raise

    @property
    def engine(self) -> Engine | None:
        """The running engine (None before start, and with the local engine without workers)."""
        return self._engine

    @property
    def abandoned_threads(self) -> int:
        """Sync task bodies this process still runs after their task timed out or was
        cancelled (see the README: what a timeout means for each executor)."""
        return self._engine.abandoned_threads if self._engine is not None else 0

    def celery_app(self) -> Celery:
        """The Celery app running this instance's task types (``CONVEYOR_ENGINE=celery``).

        Expose it from your module for Celery's own tools: ``celery_app = yard.celery_app()``,
        then ``celery -A yourmodule:celery_app worker`` (or ``inspect``, or Flower).
        """
        if self._celery is None:
            from .engines.celery_worker import build_celery_app, install_worker_hooks

            self._celery = build_celery_app(self)
            install_worker_hooks(self)
        return self._celery

    async def stop(self) -> None:
        """Stop claiming, drain running tasks up to the grace period, re-queue the rest."""
        if not self._started:
            return
        try:
            await self.retention.stop()
            if self._scheduler is not None:
                await self._scheduler.stop()
                self._scheduler = None
            if self._engine is not None:
                await self._engine.stop(self.settings.shutdown_grace_s)
            for callback in self._on_stop:
                try:
                    await callback()
                except Exception:  # one failing close leaves the others and the store to close
                    logger.exception("a stop callback failed")
        finally:
            self._engine = None
            if self._flusher is not None:
                await self._flusher.stop()
                self._flusher = None
            if self._store is not None:
                await self._store.close()
            self._store = None
            self._started = False

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await ``callback`` at each stop, once the workers are done (close what tasks used)."""
        self._on_stop.append(callback)

    async def __aenter__(self) -> Conveyor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """FastAPI lifespan: ``FastAPI(lifespan=yard.lifespan)``."""
        async with self:
            yield

    def dashboard(self, *, auth: Callable[..., Awaitable[str | None]] | None = None) -> FastAPI:
        """The dashboard as an app to mount: ``app.mount("/dashboard", yard.dashboard())``;
        ``auth``: a FastAPI dependency answering the tenant shown (None: all), or raising
        (default: the API keys)."""
        from .dashboard import build_dashboard

        return build_dashboard(self, auth=auth)

    def router(self, *, prefix: str = "") -> APIRouter:
        """The ``/tasks`` HTTP API as a FastAPI router."""
        from .api.router import build_router

        return build_router(self, prefix=prefix)

    # tasks -------------------------------------------------------------------------------------

    async def submit(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        owner: str = "",
        priority: int | None = None,
        delay_s: float | None = None,
        timeout_s: float | None = UNSET,
        idempotency_key: str | None = None,
        task_id: str | None = None,
        public_only: bool = False,
    ) -> tuple[TaskRecord, bool]:
        """Submit by name with JSON arguments; ``(record, created)``.

        ``task_id`` (from :func:`conveyor.ids.uuid7`) lets a caller place a task's input blobs
        before the task exists; ``public_only`` refuses internal task types (the HTTP API).
        """
        task_type = self.task_type(name, public_only=public_only)
        return await self.submit_validated(
            task_type,
            task_type.validate(args or {}),
            owner=owner,
            priority=priority,
            delay_s=delay_s,
            timeout_s=timeout_s,
            idempotency_key=idempotency_key,
            task_id=task_id,
        )

    async def submit_validated(
        self,
        task_type: TaskType[Any, Any],
        args: dict[str, Any],
        *,
        owner: str,
        priority: int | None,
        delay_s: float | None,
        timeout_s: float | None,
        idempotency_key: str | None,
        task_id: str | None = None,
    ) -> tuple[TaskRecord, bool]:
        if problem := reserved_key_problem(idempotency_key):
            raise InvalidArguments(problem)
        record, args_json = new_record(
            task_type,
            args,
            owner=owner,
            priority=priority,
            delay_s=delay_s,
            timeout_s=timeout_s,
            idempotency_key=idempotency_key,
            task_id=task_id,
        )
        stored, created = await self.store.insert(
            record, args_json=args_json, max_queued=self.settings.max_queued
        )
        if created:
            self.tally.count("conveyor_tasks_submitted", {"task": stored.name})
            if self._engine is not None:
                self._engine.submitted(stored)
        return stored, created

    async def submit_many(
        self,
        name: str,
        items: Sequence[Mapping[str, Any]],
        *,
        owner: str = "",
        priority: int | None = None,
        delay_s: float | None = None,
        timeout_s: float | None = UNSET,
        task_ids: Sequence[str] | None = None,
        public_only: bool = False,
    ) -> list[TaskRecord]:
        """Submit one task per item of JSON arguments, in one transaction: every task is
        committed, or none (``InvalidArguments`` locating the item, ``QueueFull``).

        ``task_ids`` (one per item) lets a caller place the tasks' input blobs first.
        """
        task_type = self.task_type(name, public_only=public_only)
        built = new_records(
            task_type,
            items,
            owner=owner,
            priority=priority,
            delay_s=delay_s,
            timeout_s=timeout_s,
            task_ids=task_ids,
        )
        stored = await self.store.insert_many(
            [record for record, _ in built],
            args_json=[args_json for _, args_json in built],
            max_queued=self.settings.max_queued,
        )
        self.tally.count("conveyor_tasks_submitted", {"task": name}, len(stored))
        if self._engine is not None:
            for record in stored:
                self._engine.submitted(record)
        return stored

    async def batch(
        self,
        name: str,
        items: Sequence[Mapping[str, Any]],
        *,
        owner: str = "",
        priority: int | None = None,
        delay_s: float | None = None,
        timeout_s: float | None = UNSET,
    ) -> BatchRecord:
        """Submit one task of type ``name`` per item of arguments as one batch, committed in
        one transaction; follow it with ``yard.batches.get(batch.id)``."""
        return await self.batches.submit(
            name, items, owner=owner, priority=priority, delay_s=delay_s, timeout_s=timeout_s
        )

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        return await self._explained(await self.store.get(task_id, owner=owner))

    async def _explained(self, record: TaskRecord) -> TaskRecord:
        """A due queued task of a rate-limited type, held back by its rate, says so in its
        ``message`` (read from the store: the same answer in every process)."""
        if record.status is not TaskStatus.QUEUED or record.message is not None:
            return record
        task_type = self.task_types.get(record.name)
        rate = None if task_type is None else task_type.options.rate
        if rate is not None and record.run_at <= time.time():
            if await self.store.rate_used(record.name, rate) >= rate.count:
                record.message = f"waiting for the rate limit of {rate}"
        return record

    async def list(
        self,
        *,
        owner: str | None = None,
        status: TaskStatus | None = None,
        name: str | None = None,
        limit: int = 50,
        before_seq: int | None = None,
        narrowed: TaskFilter = NO_FILTER,
    ) -> list[TaskRecord]:
        """Tasks newest first: ``narrowed`` to a batch, a schedule, an id prefix or a time
        range. A schedule's tasks are its owner's: one the caller cannot see lists nothing."""
        if narrowed.schedule_id is not None:
            owner = await self.schedules.owner_of(narrowed.schedule_id, owner=owner)
            if owner is None:
                return []
        return await self.store.list_tasks(
            owner=owner,
            status=status,
            name=name,
            limit=limit,
            before_seq=before_seq,
            narrowed=narrowed,
        )

    async def cancel(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        """Cancel a queued task at once; request cancellation of a running one."""
        record = await self.store.cancel(task_id, owner=owner)
        if record.status is TaskStatus.RUNNING and self._engine is not None:
            self._engine.cancel_local(record.id)
        self.notify(record.id)
        return record

    async def retry(self, task_id: str, *, owner: str | None = None) -> TaskRecord:
        """Re-run a failed or cancelled task (a new attempt budget)."""
        current = await self.store.get(task_id, owner=owner)
        attempts = (
            self.task_types[current.name].options.max_attempts
            if current.name in self.task_types
            else 1
        )
        record = await self.store.retry(task_id, owner=owner, attempts=attempts)
        if self._engine is not None:
            self._engine.submitted(record, retried=True)
        self.notify(record.id)
        return record

    async def delete(self, task_id: str, *, owner: str | None = None) -> None:
        """Forget a terminal task and remove its log lines and blobs."""
        await self.store.delete(task_id, owner=owner)
        await self.store.logs().delete(task_id)
        await asyncio.to_thread(self.blobs.delete_task, task_id)
        self.notify(task_id)

    # change notification -----------------------------------------------------------------------

    def notify(self, task_id: str) -> None:
        """Wake whoever waits on this task (in this process; others poll the store)."""
        self._watchers.notify(task_id)

    async def watch(self, task_id: str, *, owner: str | None = None) -> AsyncIterator[TaskRecord]:
        """Yield the task's record each time it changes, ending after a terminal state."""
        last: tuple[Any, ...] | None = None
        with self._watchers.watching(task_id) as watch:
            while True:
                watch.arm()
                record = await self._explained(await self.store.get(task_id, owner=owner))
                key = (record.status, record.progress, record.message, record.attempts)
                if key != last:
                    last = key
                    yield record
                if record.terminal:
                    return
                await watch.next_change()

    async def wait(
        self, task_id: str, *, owner: str | None = None, timeout_s: float | None = None
    ) -> TaskRecord:
        """Wait until the task is terminal; its record. Raises ``WaitTimeout``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        with self._watchers.watching(task_id) as watch:
            while True:
                watch.arm()
                record = await self.store.get(task_id, owner=owner)
                if record.terminal:
                    return record
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(f"task {task_id} is still {record.status.value}")
                await watch.next_change(remaining)
