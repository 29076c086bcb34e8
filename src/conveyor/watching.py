"""Waiting on tasks: who waits on which task, woken by a change notification or, as a safety
net, by a poll.

A waiter arms its task's event before it reads the task, so a change committed between the read
and the wait still wakes it. Events live only while someone waits on their task; the store's
notifications (other processes' changes) are subscribed to when the first waiter arms.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

POLL_S = 0.25
"""The longest a waiter sleeps without a notification (or the settings' ``poll_s`` if longer)."""

Subscribe = Callable[[Callable[[str], None]], None]


class Watchers:
    """The waiters of one Conveyor instance; ``subscribe`` hands a callback to its store."""

    def __init__(self, poll_s: float, subscribe: Subscribe) -> None:
        self.poll_s = max(POLL_S, poll_s)
        self._subscribe = subscribe
        self._subscribed = False
        self.events: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}  # waiters per task: an event lives while one waits

    def reset(self) -> None:
        """A new store: subscribe to its notifications when the next waiter arms."""
        self._subscribed = False

    def notify(self, task_id: str) -> None:
        """Wake whoever waits on this task in this process."""
        event = self.events.pop(task_id, None)
        if event is not None:
            event.set()

    def store_changed(self, task_id: str) -> None:
        """Another process changed a task (``""``: changes may have been missed)."""
        if task_id:
            self.notify(task_id)
            return
        changed, self.events = self.events, {}
        for event in changed.values():
            event.set()

    @contextlib.contextmanager
    def watching(self, task_id: str) -> Iterator[Watch]:
        """One waiter on ``task_id`` for the block's length."""
        self.waiting[task_id] = self.waiting.get(task_id, 0) + 1
        try:
            yield Watch(self, task_id)
        finally:
            left = self.waiting[task_id] - 1
            if left:
                self.waiting[task_id] = left
            else:
                del self.waiting[task_id]
                self.events.pop(task_id, None)

    def _event(self, task_id: str) -> asyncio.Event:
        if not self._subscribed:  # listen to other processes' changes once someone waits
            self._subscribed = True
            self._subscribe(self.store_changed)
        event = self.events.get(task_id)
        if event is None:
            event = self.events[task_id] = asyncio.Event()
        return event


class Watch:
    """One waiter: :meth:`arm` before reading the task, then :meth:`next_change`."""

    def __init__(self, watchers: Watchers, task_id: str) -> None:
        self._watchers = watchers
        self._task_id = task_id
        self._event: asyncio.Event | None = None

    def arm(self) -> None:
        self._event = self._watchers._event(self._task_id)

    async def next_change(self, limit_s: float | None = None) -> None:
        """Until the task changes, the poll interval passes or ``limit_s`` does."""
        assert self._event is not None, "arm() before reading the task"
        pause = self._watchers.poll_s if limit_s is None else min(self._watchers.poll_s, limit_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), pause)
