"""The durable record of one task, and its JSON form for the HTTP API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .status import TERMINAL, TaskStatus


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC (``2026-11-24T03:52:18.123456Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def moment_of(text: str, *, naive_is_utc: bool = False) -> float:
    """An ISO-8601 time as epoch seconds; ``ValueError`` if it is not one, or has no time zone
    (unless ``naive_is_utc``)."""
    found = datetime.fromisoformat(text)
    if found.tzinfo is None:
        if not naive_is_utc:
            raise ValueError(f"{text!r} has no time zone")
        found = found.replace(tzinfo=UTC)
    return found.timestamp()


#: the idempotency keys of the tasks a schedule makes: ``schedule:<schedule id>@<fire time>``
SCHEDULE_KEY = "schedule:"


def schedule_of(key: str | None) -> str | None:
    """The schedule named by a key made by a schedule's fire (None: not a schedule's task)."""
    if key is None or not key.startswith(SCHEDULE_KEY) or "@" not in key:
        return None
    return key[len(SCHEDULE_KEY) :].rpartition("@")[0] or None


def reserved_key_problem(key: str | None) -> str | None:
    """Why a caller's idempotency key cannot be used (None if it can): a schedule's fire keys
    its task, and the task reads its planned time back from that key."""
    if key is not None and key.startswith(SCHEDULE_KEY):
        return f"idempotency keys starting with {SCHEDULE_KEY!r} are the schedules' own"
    return None


def schedule_keys(schedule_id: str) -> tuple[str, str]:
    """The range ``[low, high)`` holding the keys of one schedule's tasks (``@`` + 1 is ``A``)."""
    return f"{SCHEDULE_KEY}{schedule_id}@", f"{SCHEDULE_KEY}{schedule_id}A"


@dataclass(slots=True)
class TaskRecord:
    """One task as the store holds it. Times are epoch seconds (UTC)."""

    id: str
    name: str
    status: TaskStatus
    args: dict[str, Any]
    owner: str = ""
    priority: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    progress: float = 0.0
    message: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    timeout_s: float | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    run_at: float = 0.0
    idempotency_key: str | None = None
    cancel_requested: bool = False
    worker_id: str | None = None
    lease_expires_at: float | None = None
    result_blob: dict[str, str] | None = None
    batch_id: str | None = None
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def schedule_id(self) -> str | None:
        """The schedule whose fire made this task (None: submitted otherwise)."""
        return schedule_of(self.idempotency_key)

    def to_json(self, prefix: str = "") -> dict[str, Any]:
        """The task JSON of the HTTP API; ``prefix`` is where the router is mounted."""
        base = f"{prefix}/tasks/{self.id}"
        links = {"self": base, "events": f"{base}/events", "result": f"{base}/result"}
        if self.batch_id is not None:
            links["batch"] = f"{prefix}/batches/{self.batch_id}"
        schedule_id = self.schedule_id
        if schedule_id is not None:
            links["schedule"] = f"{prefix}/schedules/{schedule_id}"
        created = iso(self.created_at)
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status.value,
            "progress": self.progress,
            "message": self.message,
            "args": self.args,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "timeout_s": self.timeout_s,
            "cancel_requested": self.cancel_requested,
            "created_at": created,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "run_at": created if self.run_at == self.created_at else iso(self.run_at),
            "batch_id": self.batch_id,
            "schedule_id": schedule_id,
            "links": links,
        }


@dataclass(slots=True)
class WorkerRecord:
    """One worker process as it registers itself in the store (times: epoch seconds)."""

    id: str
    host: str
    pid: int
    engine: str
    concurrency: int
    task_types: list[str]
    started_at: float
    last_heartbeat_at: float | None = None
    running: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "engine": self.engine,
            "concurrency": self.concurrency,
            "task_types": self.task_types,
            "running": self.running,
            "started_at": iso(self.started_at),
            "last_heartbeat_at": iso(self.last_heartbeat_at),
        }
