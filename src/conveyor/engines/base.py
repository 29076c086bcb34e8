"""The contract every engine implements, and the narrow host it runs for.

The store, not the engine, is the truth: an engine claims tasks from it, runs them and records
their outcomes there, so several engines in several processes may share one store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..batch_record import NewTasks
from ..blobs import BlobStore
from ..record import TaskRecord
from ..settings import Settings
from ..store import Store
from ..tally import Tally
from ..task import TaskType


class EngineHost(Protocol):
    """What an engine (and its runner) needs of the instance it runs tasks for.

    ``Conveyor`` is one; an engine never sees more of it than this.
    """

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Store: ...

    @property
    def blobs(self) -> BlobStore: ...

    @property
    def task_types(self) -> Mapping[str, TaskType[Any, Any]]: ...

    @property
    def tally(self) -> Tally:
        """What this process did, for /metrics."""
        ...

    def notify(self, task_id: str) -> None:
        """Wake whoever waits on this task in this process."""
        ...


class Engine(Protocol):
    """Claims tasks from the store and runs them.

    ``submitted`` tells of a task committed in this process (the local engine wakes its
    dispatcher; the Celery engine publishes its message); ``cancel_local`` asks the engine to stop
    a running task it holds. Everything else goes through the store.
    """

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; drain up to ``grace_s``; re-queue what is still running."""
        ...

    def submitted(self, record: TaskRecord, *, retried: bool = False) -> None:
        """A task was committed in this process (or re-queued by an explicit retry)."""
        ...

    def submitted_batch(self, tasks: NewTasks, ids: Sequence[str]) -> None:
        """A batch's tasks (``ids``) were committed in this process."""
        ...

    def cancel_local(self, task_id: str) -> bool: ...

    @property
    def abandoned_threads(self) -> int:
        """Sync task bodies still running on threads after their task ended (a timeout or a
        cancel: Python cannot stop a thread)."""
        ...
