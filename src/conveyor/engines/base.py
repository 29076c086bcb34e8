"""The contract every engine implements; the store, not the engine, is the truth."""

from __future__ import annotations

from typing import Protocol

from ..record import TaskRecord


class Engine(Protocol):
    """Claims tasks from the store and runs them.

    ``wake`` is a hint that work is waiting; ``submitted`` tells of a task committed in this
    process (the Celery engine publishes its message); ``cancel_local`` asks
    the engine to stop a running task it holds. Everything else goes through the store, so several
    engines in several processes may share one store.
    """

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; drain up to ``grace_s``; re-queue what is still running."""
        ...

    def wake(self) -> None: ...

    def submitted(self, record: TaskRecord, *, retried: bool = False) -> None:
        """A task was committed in this process (or re-queued by an explicit retry)."""
        ...

    def cancel_local(self, task_id: str) -> bool: ...
