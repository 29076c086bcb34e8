"""Conveyor's errors: one tree, one base class.

    ConveyorError
    ├── ConfigurationError        settings or task definitions that cannot work
    ├── TaskTypeError             a task type cannot be registered (bad signature, duplicate name)
    ├── UnknownTaskType           submit of a name nobody registered            → 422
    ├── InvalidArguments          arguments that fail validation (with details)  → 422
    ├── TaskNotFound              no such task (or not this tenant's)            → 404
    ├── ScheduleNotFound          no such schedule (or not this tenant's)        → 404
    ├── ScheduleConflict          a schedule of that name exists already         → 409
    ├── TaskStateConflict         the task's state forbids the operation         → 409
    ├── QueueFull                 back-pressure: too many queued tasks           → 429
    ├── StoreUnavailable          the store cannot be reached or written         → 503
    ├── PayloadTooLarge           an upload or image past a configured limit     → 413
    ├── InsufficientStorage       no room on the disk for an upload or the store → 507
    ├── UnsupportedMediaType      content Conveyor refuses to read               → 415
    ├── NotStarted                the Conveyor instance is not started
    ├── TaskCancelled             raised inside a task when cancellation was requested
    ├── TaskFailed                raised by ``TaskHandle.result()`` for a failed task
    └── WaitTimeout               ``TaskHandle.wait()`` ran out of time

Foreign errors (sqlite3, pydantic, …) are translated once, at the boundary, with ``raise … from``.
The HTTP layer maps this tree to status codes in one exception handler (``api/errors.py``).
"""

from __future__ import annotations

import errno
from typing import Any


class ConveyorError(Exception):
    """Base class of every error Conveyor raises."""

    status_code = 500

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class ConfigurationError(ConveyorError):
    """Settings that cannot work together."""


class TaskTypeError(ConveyorError):
    """A task type that cannot be registered."""


class UnknownTaskType(ConveyorError):
    """A submission named a task type that is not registered."""

    status_code = 422


class InvalidArguments(ConveyorError):
    """Arguments failed validation; ``details`` lists each problem with its location."""

    status_code = 422


class TaskNotFound(ConveyorError):
    """No task with that id (or not visible to this tenant)."""

    status_code = 404


class ScheduleNotFound(ConveyorError):
    """No schedule with that id (or not visible to this tenant)."""

    status_code = 404


class BatchNotFound(ConveyorError):
    """No batch with this id (for this tenant)."""

    status_code = 404


class BatchExists(ConveyorError):
    """A batch with this id is committed already (a concurrent submission under the same
    idempotency key won)."""

    status_code = 409


class ScheduleConflict(ConveyorError):
    """A schedule of that name exists already for this tenant."""

    status_code = 409


class TaskStateConflict(ConveyorError):
    """The task's current state forbids the operation."""

    status_code = 409


class QueueFull(ConveyorError):
    """Too many tasks are queued; retry after ``retry_after_s`` seconds."""

    status_code = 429

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreUnavailable(ConveyorError):
    """The store could not be reached or written."""

    status_code = 503


class PayloadTooLarge(ConveyorError):
    """An upload, or an image's pixel count, is past a configured limit."""

    status_code = 413


class InsufficientStorage(ConveyorError):
    """The server's disk has no room for an upload or for the store to grow (nothing of the
    request was kept)."""

    status_code = 507


# a full disk, a full quota, or a file-size limit (RLIMIT_FSIZE) on the server process
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_room(exc: BaseException) -> InsufficientStorage | None:
    """The ``507`` to answer for a write that failed for lack of space, else None."""
    if isinstance(exc, OSError) and exc.errno in NO_ROOM:
        return InsufficientStorage(f"no room on the server's disk for this upload ({exc.strerror})")
    return None


class UnsupportedMediaType(ConveyorError):
    """Content of a kind Conveyor refuses to read (sniffed from the bytes, not the name)."""

    status_code = 415


class NotStarted(ConveyorError):
    """The Conveyor instance must be started (``async with yard`` or ``yard.lifespan``)."""


class TaskCancelled(ConveyorError):
    """Raised inside a task by ``ctx.raise_if_cancelled()`` once cancellation was requested."""


class TaskFailed(ConveyorError):
    """The awaited task ended ``failed``; ``error`` holds its ``{type, message, traceback}``."""

    def __init__(self, message: str, *, error: dict[str, Any]) -> None:
        super().__init__(message)
        self.error = error


class WaitTimeout(ConveyorError):
    """A wait for a task ran out of time before the task reached a terminal state."""
