"""Task states, the transitions allowed between them, and the rules both stores enforce.

``queued → running → completed | failed | cancelled``, ``running → queued`` for a retry or a
recovery, and ``failed | cancelled → queued`` for an explicit retry. Terminal states never change
otherwise. The stores call the ``require_*`` rules inside the transaction that reads the task's
current state, so one table decides every transition and every conflict message.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import TaskStateConflict


class TaskStatus(StrEnum):
    """The state of a task; the same strings in the store, the JSON API and the dashboard."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[TaskStatus] = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
)
ACTIVE: frozenset[TaskStatus] = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})
RETRYABLE: frozenset[TaskStatus] = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED})

_ALLOWED: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.QUEUED}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset({TaskStatus.QUEUED}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.QUEUED}),
}


def can_transition(current: TaskStatus, target: TaskStatus) -> bool:
    """Whether a task in ``current`` may move to ``target``."""
    return target in _ALLOWED[current]


def require_transition(task_id: str, current: TaskStatus, target: TaskStatus) -> None:
    """Raise ``TaskStateConflict`` (409) unless ``current → target`` is allowed."""
    if not can_transition(current, target):
        raise TaskStateConflict(_CONFLICTS[target].format(id=task_id, status=current.value))


def cancel_outcome(task_id: str, current: TaskStatus) -> TaskStatus:
    """What cancelling a task in ``current`` does: ``CANCELLED`` at once (queued), or
    ``RUNNING`` with a cancel request its worker acts on; ``TaskStateConflict`` when terminal."""
    require_transition(task_id, current, TaskStatus.CANCELLED)
    return TaskStatus.CANCELLED if current is TaskStatus.QUEUED else TaskStatus.RUNNING


def require_retryable(task_id: str, current: TaskStatus) -> None:
    """An explicit retry re-queues only a failed or cancelled task."""
    if current not in RETRYABLE:
        raise TaskStateConflict(
            _CONFLICTS[TaskStatus.QUEUED].format(id=task_id, status=current.value)
        )


def require_deletable(task_id: str, current: TaskStatus) -> None:
    """Only a terminal task may be forgotten."""
    if current not in TERMINAL:
        raise TaskStateConflict(_FORGET_CONFLICT.format(id=task_id, status=current.value))


_CONFLICTS: dict[TaskStatus, str] = {
    TaskStatus.CANCELLED: "task {id} is already {status}; it cannot be cancelled",
    TaskStatus.QUEUED: "task {id} is {status}; only failed or cancelled tasks can be retried",
}
_FORGET_CONFLICT = "task {id} is {status}; cancel it or wait until it ends"
