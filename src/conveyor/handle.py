"""Typed handles on submitted tasks."""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar, cast

from .errors import TaskFailed, TaskStateConflict
from .record import TaskRecord
from .status import TaskStatus

R = TypeVar("R")


class TaskAccess(Protocol):
    """What a handle needs to follow its task (``Conveyor`` is one)."""

    async def get(self, task_id: str, *, owner: str | None = None) -> TaskRecord: ...

    async def wait(
        self, task_id: str, *, owner: str | None = None, timeout_s: float | None = None
    ) -> TaskRecord: ...

    async def cancel(self, task_id: str, *, owner: str | None = None) -> TaskRecord: ...


class TaskHandle(Generic[R]):
    """A submitted task: ``await handle.wait()``, ``.result()``, ``.cancel()``, ``.status()``."""

    def __init__(self, task_id: str, tasks: TaskAccess, *, owner: str | None = None) -> None:
        self.id = task_id
        self._tasks = tasks
        self._owner = owner

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"

    async def status(self) -> TaskRecord:
        """The task's current record."""
        return await self._tasks.get(self.id, owner=self._owner)

    async def wait(self, timeout_s: float | None = None) -> TaskRecord:
        """Wait until the task is terminal; its record. Raises ``WaitTimeout``."""
        return await self._tasks.wait(self.id, owner=self._owner, timeout_s=timeout_s)

    async def result(self, timeout_s: float | None = None) -> R:
        """Wait for the task and return its result; ``TaskFailed`` if it failed."""
        record = await self.wait(timeout_s)
        if record.status is TaskStatus.FAILED:
            error: dict[str, Any] = record.error or {}
            raise TaskFailed(
                f"task {self.id} failed: {error.get('type')}: {error.get('message')}", error=error
            )
        if record.status is TaskStatus.CANCELLED:
            raise TaskStateConflict(f"task {self.id} was cancelled")
        return cast(R, record.result)

    async def cancel(self) -> TaskRecord:
        """Cancel the task (queued: at once; running: requested)."""
        return await self._tasks.cancel(self.id, owner=self._owner)
