"""What a running task sees of Conveyor: its id, attempt, progress, cancellation and a logger."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Awaitable, Callable, Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .blobs import BlobStore
from .errors import TaskCancelled

_logger = logging.getLogger("conveyor.task")


class _Done:
    """An awaitable that is already finished (progress reported from a thread or a child)."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


_DONE = _Done()

ProgressReporter = Callable[[float, str | None], Awaitable[None] | None]


class TaskContext:
    """Handed to a task function as its first parameter.

    Example:
        ```python
        @yard.task(timeout_s=30)
        async def process(ctx: TaskContext, data: str) -> str:
            await ctx.progress(50, "half way")
            ctx.raise_if_cancelled()
            return data.upper()
        ```
    """

    def __init__(
        self,
        *,
        task_id: str,
        name: str,
        attempt: int,
        max_attempts: int,
        reporter: ProgressReporter,
        cancel_event: threading.Event | None = None,
        blobs: BlobStore | None = None,
        scheduled_for: float | None = None,
        batch_id: str | None = None,
    ) -> None:
        self.task_id = task_id
        #: the batch this task is an item of (None otherwise)
        self.batch_id = batch_id
        #: the planned fire time of the schedule that made this task (UTC; None otherwise)
        self.scheduled_for = (
            None if scheduled_for is None else datetime.fromtimestamp(scheduled_for, UTC)
        )
        self.name = name
        self.attempt = attempt
        self.max_attempts = max_attempts
        self._reporter = reporter
        self._cancel_event = cancel_event or threading.Event()
        self._blobs = blobs
        self.log = logging.LoggerAdapter(
            _logger, {"task_id": task_id, "task_name": name, "attempt": attempt}
        )

    @property
    def cancelled(self) -> bool:
        """True once cancellation (or a timeout) was requested; sync tasks should then stop."""
        return self._cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`TaskCancelled` if cancellation was requested."""
        if self._cancel_event.is_set():
            raise TaskCancelled(f"task {self.task_id} was cancelled")

    def progress(self, percent: float, message: str | None = None) -> Awaitable[None]:
        """Record progress (0 to 100) with an optional message; persisted and streamed to /events.

        Awaiting it (in an async task) waits until it is stored; a sync task may call it without
        awaiting.
        """
        if not isinstance(percent, int | float) or math.isnan(percent) or not 0 <= percent <= 100:
            raise ValueError(f"progress must be a number from 0 to 100, got {percent!r}")
        if message is not None:
            message = str(message)[:1000]
        pending = self._reporter(float(percent), message)
        return _DONE if pending is None else pending

    def blob_path(self, blob_id: str) -> Path:
        """The file of a blob this task reads (an upload) or writes."""
        return self._require_blobs().path(blob_id)

    def new_blob(self, name: str) -> tuple[str, Path]:
        """A new blob in this task's folder: ``(blob_id, path)``; write the file at ``path``."""
        blobs = self._require_blobs()
        blob_id = blobs.blob_id(self.task_id, name)
        return blob_id, blobs.path(blob_id)

    def _require_blobs(self) -> BlobStore:
        if self._blobs is None:
            raise RuntimeError("this context has no blob store")
        return self._blobs

    def request_cancel(self) -> None:
        self._cancel_event.set()
