"""A pool of child processes for CPU-bound tasks, where one child can be killed and replaced.

``concurrent.futures.ProcessPoolExecutor`` cannot stop one running call, so cancellation and
timeouts of ``executor="process"`` tasks kill that child; the next task spawns a fresh one.
Children are started with ``spawn`` (never ``fork`` from a threaded parent) and import the task's
module by name; every message (arguments, progress, results, errors) crosses the pipe as JSON.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from .. import serialization, tasklogs
from ..blobs import BlobStore, encode_result
from ..context import TaskContext

CHILD_NICENESS = 5


class ChildTaskError(Exception):
    """The task raised in the child process (or the child died)."""

    def __init__(self, type_name: str, message: str, tb: str | None, *, lineage: list[str]) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = tb
        self.lineage = lineage

    def matches(self, classes: tuple[type[BaseException], ...]) -> bool:
        """Whether the child's exception is an instance of one of ``classes``."""
        return any(name in self.lineage for name in map(_qualified, classes))


def send(conn: Connection, message: list[Any]) -> None:
    """Messages cross the pipe as JSON (``Connection.send`` would pickle them)."""
    conn.send_bytes(json.dumps(message, separators=(",", ":")).encode())


def receive(conn: Connection) -> list[Any]:
    message: list[Any] = json.loads(conn.recv_bytes())
    return message


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _qualified(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Child:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    async def receive(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        fd = self.conn.fileno()
        while not self.conn.poll():
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        try:
            message = receive(self.conn)
        except (EOFError, OSError) as exc:
            await asyncio.to_thread(self.process.join, 5)
            raise ChildTaskError(
                "WorkerLost",
                f"the child process running the task died (exit code {self.process.exitcode})",
                None,
                lineage=exception_names(Exception),
            ) from exc
        return message

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class ProcessPool:
    """At most ``size`` children; each runs one task at a time."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._spawning = 0
        self._context = multiprocessing.get_context("spawn")

    async def run(
        self,
        module: str,
        qualname: str,
        args: dict[str, Any],
        *,
        task: tuple[str, str, int, int, float | None, str | None],
        blob_root: str,
        on_progress: Callable[[float, str | None], object],
        on_start: Callable[[], object] = lambda: None,
        on_log: Callable[[str, str, float], object] = lambda level, text, at: None,
    ) -> tuple[str, str | None]:
        """Run the task type ``module:qualname`` in a child; ``(result JSON, blob JSON)``.

        ``on_start`` is called once a child is the task's: the wait for a free child before
        it is not the task's run (its timeout starts there)."""
        async with self._slots:
            child = await self._take_idle() or await self._spawn()
            self._busy.add(child)
            on_start()
            reusable = False
            try:
                send(child.conn, ["run", module, qualname, args, blob_root, *task])
                while True:
                    message = await child.receive()
                    if message[0] == "progress":
                        on_progress(message[1], message[2])
                        continue
                    if message[0] == "log":
                        on_log(message[1], message[2], message[3])
                        continue
                    reusable = True
                    if message[0] == "ok":
                        return message[1], message[2]
                    _, type_name, text, tb, lineage = message
                    raise ChildTaskError(type_name, text, tb, lineage=lineage)
            finally:
                self._busy.discard(child)
                if reusable:
                    self._idle.append(child)
                else:  # cancelled, timed out or died mid-task: never reuse
                    await asyncio.to_thread(child.kill)

    async def _take_idle(self) -> _Child | None:
        """An idle child that is still alive; a dead one (killed, or out of memory while idle)
        is cleaned up, not handed a task."""
        while self._idle:
            child = self._idle.pop()
            if child.process.is_alive():
                return child
            await asyncio.to_thread(child.kill)
        return None

    async def warm(self) -> None:
        """Start the children now, so the first tasks do not wait for a spawn."""
        while len(self._idle) + len(self._busy) + self._spawning < self._size:
            self._idle.append(await self._spawn())

    async def _spawn(self) -> _Child:
        _allow_children()
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main, args=(child_conn,), name="conveyor-task-process", daemon=True
        )
        self._spawning += 1
        try:
            await asyncio.to_thread(process.start)
        finally:
            self._spawning -= 1
        child_conn.close()
        return _Child(process, parent_conn)

    async def close(self) -> None:
        children = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for child in children:
            await asyncio.to_thread(child.kill)


def _allow_children() -> None:
    """A Celery prefork pool process is daemonic, and ``multiprocessing`` refuses children to a
    daemonic process (daemons are stopped without waiting, so their children could be left
    behind). This pool's children are daemons themselves and killed with it, so the refusal
    does not apply: the flag is lifted for this process."""
    current = multiprocessing.current_process()
    if current.daemon:
        current._config["daemon"] = False  # type: ignore[attr-defined]
        # billiard (Celery's fork of multiprocessing) left its own key type, which the standard
        # library's spawn refuses to send: the same bytes, as the standard library's type
        key = multiprocessing.process.AuthenticationString(bytes(current.authkey))  # type: ignore[attr-defined]
        current._config["authkey"] = key  # type: ignore[attr-defined]


def _child_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    # CPU-bound children yield to the parent: the event loop that hands them their next task
    # (and serves the API) must not wait behind them for a time slice
    os.nice(CHILD_NICENESS)
    tasklogs.install()
    while True:
        try:
            message = receive(conn)
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message[0] != "run":
            return
        _, module, qualname, args, blob_root, *task = message
        send(conn, _run_in_child(conn, module, qualname, args, Path(blob_root), *task))


_targets: dict[tuple[str, str], tuple[Callable[..., Any], bool, Any]] = {}


def _load_target(module: str, qualname: str, name: str) -> tuple[Callable[..., Any], bool, Any]:
    from ..task import TaskType, _argument_model

    key = (module, qualname)
    if key not in _targets:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        fn = target.fn if isinstance(target, TaskType) else target
        if not callable(fn):
            raise TypeError(f"{module}:{qualname} is not a function")
        takes_context, model = _argument_model(fn, name)
        _targets[key] = (fn, takes_context, model)
    return _targets[key]


def _run_in_child(
    conn: Connection,
    module: str,
    qualname: str,
    args: dict[str, Any],
    blob_root: Path,
    task_id: str,
    name: str,
    attempt: int,
    max_attempts: int,
    scheduled_for: float | None = None,
    batch_id: str | None = None,
) -> list[Any]:
    try:
        fn, takes_context, model = _load_target(module, qualname, name)
        validated = model.model_validate(args)
        kwargs = {field: getattr(validated, field) for field in type(validated).model_fields}
        ctx = TaskContext(
            task_id=task_id,
            name=name,
            attempt=attempt,
            max_attempts=max_attempts,
            reporter=lambda percent, text: send(conn, ["progress", percent, text]),
            blobs=BlobStore(blob_root),
            scheduled_for=scheduled_for,
            batch_id=batch_id,
        )
        tasklogs.CURRENT.set(_PipeLog(conn, task_id, name, attempt))
        value = fn(ctx, **kwargs) if takes_context else fn(**kwargs)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        try:
            return ["ok", *encode_result(value)]
        except serialization.JSONError as exc:
            return ["error", "TypeError", f"the result is {exc}", None, []]
    except BaseException as exc:  # sys.exit() in a task ends the task, not the child
        tb = "".join(traceback.format_exception(exc))
        return ["error", type(exc).__name__, error_message(exc), tb, exception_names(type(exc))]


class _PipeLog(tasklogs.TaskLog):
    """A child's task log: each line goes to the parent at once, which keeps it."""

    def __init__(self, conn: Connection, task_id: str, task: str, attempt: int) -> None:
        super().__init__(task_id, task, attempt, worker=f"child:{os.getpid()}")
        self._conn = conn

    def add(self, level: str, message: str, at: float | None = None) -> None:
        send(self._conn, ["log", level, message[: tasklogs.MAX_MESSAGE], at or time.time()])


def error_message(exc: BaseException) -> str:
    """What went wrong, in words, also for the exceptions that would stop a process."""
    if isinstance(exc, SystemExit):
        return f"the task called sys.exit({exc.code!r}); a task cannot stop its worker"
    if isinstance(exc, KeyboardInterrupt):
        return "the task raised KeyboardInterrupt; a task cannot stop its worker"
    if isinstance(exc, asyncio.CancelledError):
        return "the task's own code raised CancelledError (nobody cancelled it)"
    return str(exc)


def exception_names(cls: type[BaseException]) -> list[str]:
    """Qualified names of an exception class and its bases (to match ``retry_on`` by name)."""
    return [_qualified(c) for c in cls.__mro__]


async def _await(value: Any) -> Any:
    return await value
