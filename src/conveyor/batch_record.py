"""The durable record of a batch: many tasks of one type submitted together, and their counts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .record import iso
from .status import TaskStatus

ACTIVE = (TaskStatus.QUEUED.value, TaskStatus.RUNNING.value)
# A batch's new tasks are made and written this many at a time.
CHUNK = 4096


@dataclass(slots=True)
class NewTasks:
    """A new batch's tasks, all queued: what they share, and ``chunks`` of their ids with their
    arguments as JSON (at most :data:`CHUNK` each). The chunks may be made while the first ones
    are written; making one may raise (a bad item), and then nothing is committed."""

    name: str
    owner: str
    priority: int
    max_attempts: int
    timeout_s: float | None
    created_at: float
    run_at: float
    batch_id: str
    chunks: Iterable[tuple[list[str], list[str]]]


@dataclass(slots=True)
class BatchRecord:
    """One batch. ``counts`` holds every status (zeros included); ``running_progress`` is the sum
    of its running items' progress, so that ``progress`` counts work under way."""

    id: str
    name: str
    total: int
    owner: str = ""
    created_at: float = 0.0
    finished_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    running_progress: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # kept with the batch (a service's data)

    @property
    def active(self) -> int:
        """Items not yet in a terminal state."""
        return sum(self.counts.get(status, 0) for status in ACTIVE)

    @property
    def progress(self) -> float:
        """0-100: finished items count whole, running ones by their own progress."""
        if self.total == 0:
            return 100.0
        finished = self.total - self.active
        return round(min(100.0, (finished * 100 + self.running_progress) / self.total), 2)

    def to_json(self, prefix: str = "") -> dict[str, Any]:
        base = f"{prefix}/batches/{self.id}"
        return {
            "id": self.id,
            "name": self.name,
            "status": "active" if self.active else "finished",
            "total": self.total,
            "counts": {status.value: self.counts.get(status.value, 0) for status in TaskStatus},
            "progress": self.progress,
            "created_at": iso(self.created_at),
            "finished_at": None if self.active else iso(self.finished_at),
            "links": {"self": base, "items": f"{base}/items", "events": f"{base}/events"},
        }
