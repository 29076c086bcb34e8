"""Threads for sync tasks: one per running body, none ever waited for at exit.

Python cannot stop a thread. A sync task that times out, or is cancelled, while its body still
runs ends all the same (``failed: TimeoutError``, or ``cancelled``); its thread is *abandoned*: it
runs on until the body returns, on a thread of its own, so the tasks after it get threads of
their own too. Until then it still counts against its type's ``concurrency`` in this process, and
``/health`` reports it. Threads are daemons, so a process stops within its grace period whatever
a stuck body does (``concurrent.futures`` joins its threads at exit; these are not joined).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

_Job = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


class TaskThreads:
    """Runs sync callables on threads: an idle one, or a new one when all are busy.

    Args:
        keep_idle: threads kept waiting for work once their body returned; more end.
    """

    def __init__(self, *, keep_idle: int, name: str = "conveyor-task") -> None:
        self._keep_idle = keep_idle
        self._name = name
        self._idle: list[queue.SimpleQueue[_Job | None]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.abandoned: Counter[str] = Counter()  # task type → bodies still running

    @property
    def abandoned_total(self) -> int:
        return sum(self.abandoned.values())

    async def run(self, fn: Callable[[], Any], *, type_name: str) -> Any:
        """Run ``fn`` on a thread and return its result. If the caller is cancelled (a timeout,
        a cancel request), the body runs on, counted in ``abandoned[type_name]`` until it ends."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._start((fn, future, loop))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                self.abandoned[type_name] += 1
                future.add_done_callback(lambda ended: self._body_ended(ended, type_name))
            raise

    def close(self) -> None:
        """Let idle threads end; busy ones end with their body (nobody waits for them)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)

    def _body_ended(self, future: asyncio.Future[Any], type_name: str) -> None:
        if not future.cancelled():
            future.exception()  # what an abandoned body raised has nobody left to read it
        self.abandoned[type_name] -= 1
        if self.abandoned[type_name] <= 0:
            del self.abandoned[type_name]

    def _start(self, job: _Job) -> None:
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._work, args=(inbox,), name=self._name, daemon=True
            )
            thread.start()
        inbox.put(job)

    def _work(self, inbox: queue.SimpleQueue[_Job | None]) -> None:
        while True:
            job = inbox.get()
            if job is None:
                return
            fn, future, loop = job
            try:
                outcome: tuple[bool, Any] = (True, fn())
            except BaseException as exc:  # the task's, delivered to its coroutine
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, outcome)
            except RuntimeError:  # the loop is closed: nobody waits for this body any more
                return
            with self._lock:
                if self._closed or len(self._idle) >= self._keep_idle:
                    return
                self._idle.append(inbox)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
