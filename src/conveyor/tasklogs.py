"""Log records bound to the task that emitted them.

While a task runs, :data:`CURRENT` (a context variable) holds its :class:`TaskLog`: set by the
runner around the task's call, copied into the thread of a sync task, so ``ctx.log`` and any
``logging`` call in the task's code (its libraries too) are seen as the task's. Two pieces hang
on the root logger, once per process (:func:`install`):

- :class:`TaskFields`, a filter on the root logger's handlers that gives every record
  ``task_id``, ``task``, ``attempt`` and ``worker`` (None outside a task), for formats to use;
- :class:`TextFormatter` and :class:`JsonFormatter` (``CONVEYOR_LOG_FORMAT=json``: one JSON
  object per line, the standard library's ``json``, no new dependency) show those fields;
- :class:`TaskLogHandler`, which keeps the task's own lines (level INFO and up) in its
  :class:`TaskLog` until the runner writes them to the store (at each heartbeat and when the
  attempt ends). A task keeps its last :data:`MAX_LINES` lines of at most
  :data:`MAX_MESSAGE` characters each.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass

MAX_LINES = 1000
MAX_MESSAGE = 2000


@dataclass(frozen=True, slots=True)
class LogLine:
    at: float
    level: str
    message: str
    attempt: int


class TaskLog:
    """The lines one attempt of a task has logged and that are not written yet."""

    def __init__(self, task_id: str, task: str, attempt: int, worker: str) -> None:
        self.task_id = task_id
        self.task = task
        self.attempt = attempt
        self.worker = worker
        self._pending: deque[LogLine] = deque(maxlen=MAX_LINES)
        self._lock = threading.Lock()  # sync tasks log from their own thread

    def add(self, level: str, message: str, at: float | None = None) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "…"
        line = LogLine(time.time() if at is None else at, level, message, self.attempt)
        with self._lock:
            self._pending.append(line)

    def take(self) -> list[LogLine]:
        """The pending lines, oldest first; they are no longer pending."""
        with self._lock:
            lines = list(self._pending)
            self._pending.clear()
        return lines


CURRENT: ContextVar[TaskLog | None] = ContextVar("conveyor_task_log", default=None)


class TaskFields(logging.Filter):
    """Adds ``task_id``, ``task``, ``attempt`` and ``worker`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        log = CURRENT.get()
        if not hasattr(record, "task_id") or record.task_id is None:
            record.task_id = log.task_id if log else None
        record.task = log.task if log else None
        record.attempt = log.attempt if log else None
        record.worker = log.worker if log else None
        return True


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {
        "task_id": getattr(record, "task_id", None),
        "task": getattr(record, "task", None),
        "attempt": getattr(record, "attempt", None),
        "worker": getattr(record, "worker", None),
    }


class TextFormatter(logging.Formatter):
    """``time level logger: message``, and the task's fields when logged inside a task."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields["task_id"] is None:
            return text
        return (
            f"{text} [task={fields['task']} id={fields['task_id']} attempt={fields['attempt']} "
            f"worker={fields['worker']}]"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``at`` (ISO-8601 UTC), ``level``, ``logger``, ``message``,
    the task's fields (null outside a task) and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TaskLogHandler(logging.Handler):
    """Keeps each record emitted inside a task in that task's :class:`TaskLog`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        log = CURRENT.get()
        if log is None:
            return
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        except Exception:  # a bad format string is the task's bug, not the worker's
            message = str(record.msg)
        log.add(record.levelname, message, record.created)


_installed = threading.Lock()
_HANDLER: TaskLogHandler | None = None


def install() -> None:
    """Hang the handler (and the fields filter on every root handler) once per process."""
    global _HANDLER
    with _installed:
        root = logging.getLogger()
        if _HANDLER is None:
            _HANDLER = TaskLogHandler()
            root.addHandler(_HANDLER)
        for handler in root.handlers:
            if not any(isinstance(f, TaskFields) for f in handler.filters):
                handler.addFilter(TaskFields())
        task_logger = logging.getLogger("conveyor.task")
        if task_logger.getEffectiveLevel() > logging.INFO:
            task_logger.setLevel(logging.INFO)  # ctx.log.info is kept, whatever the root says
