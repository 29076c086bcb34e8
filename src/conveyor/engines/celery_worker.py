"""Running Conveyor inside Celery's worker: the app's task handlers, one runtime per process.

Each Celery task is named after a task type and takes a task id; its handler hands the id to
this process's :class:`~conveyor.engines.celery.CeleryEngine` (the runtime). In a prefork pool
process the runtime is started right after the fork, on an event loop in a thread of its own,
and stopped (recording what it ran) when the process shuts down; in the app's own process (the
embedded worker) it is the engine its instance started.
"""

from __future__ import annotations

import asyncio
import keyword
import logging
import re
import threading
from typing import Any, Protocol

from celery import Celery, signals
from celery.exceptions import Reject

from ..errors import ConfigurationError
from . import celery as engine_module  # its lock is replaced after a fork: read it there
from .base import Engine, EngineHost
from .celery import RUNTIMES, CeleryEngine
from .celery_config import new_celery_app

logger = logging.getLogger("conveyor.engine")


class WorkerHost(EngineHost, Protocol):
    """An instance that Celery's worker processes start and stop on their own."""

    @property
    def engine(self) -> Engine | None: ...

    async def start_for_celery_worker(self) -> None: ...

    async def stop(self) -> None: ...


def build_celery_app(host: WorkerHost) -> Celery:
    """A Celery app whose tasks are ``host``'s task types (one Celery task per type)."""
    app = new_celery_app(host.settings)
    for name in host.task_types:
        app.task(name=name, shared=False, acks_late=True, reject_on_worker_lost=True)(
            _message_handler(host, name)
        )
    return app


def _message_handler(host: WorkerHost, name: str) -> Any:
    def run(task_id: str) -> None:
        if not isinstance(task_id, str) or len(task_id) > 100:
            logger.error("dropped a malformed %s message: %r", name, task_id)
            return
        if not runtime_for(host).handle(name, task_id):  # another worker, or this one later
            raise Reject("cannot run the task now", requeue=True)

    run.__name__ = handler_name(name)
    return run


def handler_name(task_name: str) -> str:
    """A Python name for a task type's handler: Celery compiles a function of that name (a
    type named ``reports.async`` or ``make-thumbnail`` must not break the worker)."""
    name = re.sub(r"\W", "_", task_name.rpartition(".")[2])
    if not name.isidentifier() or keyword.iskeyword(name):
        name = f"task_{name}"
    return name


def runtime_for(host: WorkerHost) -> CeleryEngine:
    """This process's runtime for ``host``: the embedded engine, or one started on first use
    (in a prefork pool process, after the fork)."""
    runtime = RUNTIMES.get(id(host))  # called per message: no lock once it exists
    if runtime is not None:
        return runtime
    with engine_module.RUNTIMES_LOCK:
        runtime = RUNTIMES.get(id(host))
        if runtime is None:
            runtime = _start_worker_runtime(host)
            RUNTIMES[id(host)] = runtime
        return runtime


def _start_worker_runtime(host: WorkerHost) -> CeleryEngine:
    """Start ``host`` on an event loop in a thread of its own, to run tasks for Celery (uvloop
    when installed, as uvicorn uses: asyncpg's round trips cost less on it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="conveyor-runtime", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(host.start_for_celery_worker(), loop).result(60)
    engine = host.engine
    assert isinstance(engine, CeleryEngine)
    return engine


def stop_runtime(host: WorkerHost) -> None:
    """Stop this process's runtime, if it has one: the outcomes still being recorded are written
    (a message is acknowledged once its task has run, while its outcome is written behind it)."""
    with engine_module.RUNTIMES_LOCK:
        runtime = RUNTIMES.get(id(host))
    # a forked process starts with none (_forget_runtimes_after_fork): any found is this one's
    if runtime is None or runtime.loop.is_closed():
        return
    if runtime.consuming or runtime.stopping:  # an embedded worker stops with its instance
        return
    grace_s = host.settings.shutdown_grace_s + 5.0
    try:
        asyncio.run_coroutine_threadsafe(host.stop(), runtime.loop).result(grace_s)
    except Exception:
        logger.exception("Conveyor's runtime did not stop cleanly")
    runtime.loop.call_soon_threadsafe(runtime.loop.stop)


def install_worker_hooks(host: WorkerHost) -> None:
    """Start each prefork pool process's runtime as soon as it is forked (not on first task),
    and stop it (recording what it ran) when the process or the worker shuts down."""

    def on_process_init(**_: Any) -> None:
        try:
            runtime_for(host)
        except Exception:
            logger.exception("the worker process could not start Conveyor's runtime")
            raise

    def on_ready(sender: Any = None, **_: Any) -> None:
        pool = getattr(getattr(sender, "pool", None), "__module__", "")
        if not pool.endswith("prefork"):  # solo and threads pools run tasks in this process
            runtime_for(host)

    def on_shutdown(**_: Any) -> None:
        stop_runtime(host)

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_process_shutdown.connect(on_shutdown, weak=False)  # in each pool process
    signals.worker_shutdown.connect(on_shutdown, weak=False)  # solo and threads pools


def run_celery_worker(
    celery: Celery, *, queue: str, pool: str, concurrency: int, log_level: str
) -> None:
    """Run Celery's worker in this process until it is stopped (``conveyor worker``)."""
    if pool not in ("prefork", "threads", "solo"):
        raise ConfigurationError("--pool must be prefork, threads or solo")
    celery.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={queue}",
            f"--loglevel={log_level.upper()}",
            "--without-mingle",
            "--without-gossip",
        ]
    )
