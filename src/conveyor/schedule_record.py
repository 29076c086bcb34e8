"""The durable record of one periodic schedule, and of one planned fire of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .cron import Spec, invalid, jitter_offset, next_fire
from .record import SCHEDULE_KEY, iso

MISFIRE = ("skip", "run_once")
OVERLAP = ("allow", "skip_if_running")
# what happened to a planned fire
FIRED, TRIGGERED, SKIPPED_OVERLAP, MISSED = "fired", "triggered", "skipped_overlap", "missed"


@dataclass(slots=True)
class ScheduleRecord:
    """One schedule: a task type, its arguments, and when it fires. Times are epoch seconds."""

    id: str
    name: str
    task: str
    args: dict[str, Any]
    owner: str = ""
    cron: str | None = None
    every_s: float | None = None
    timezone: str = "UTC"
    start_at: float | None = None
    end_at: float | None = None
    jitter_s: float = 0.0
    misfire: str = "skip"
    max_lateness_s: float = 60.0
    overlap: str = "allow"
    enabled: bool = True
    from_code: bool = False
    next_fire_at: float | None = None  # the next planned fire (its jitter not added)
    last_task_id: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def spec(self) -> Spec:
        return Spec(
            cron=self.cron,
            every_s=self.every_s,
            timezone=self.timezone,
            start_at=self.start_at,
            end_at=self.end_at,
        )

    def check(self) -> None:
        """Raise a ``422`` naming the field when this schedule cannot work."""
        self.spec.check()
        if self.misfire not in MISFIRE:
            raise invalid("misfire", f"one of {', '.join(MISFIRE)}")
        if self.overlap not in OVERLAP:
            raise invalid("overlap", f"one of {', '.join(OVERLAP)}")
        if not 0 <= self.jitter_s <= 3600:
            raise invalid("jitter_s", "between 0 and 3600 seconds")
        if not self.max_lateness_s >= 0:
            raise invalid("max_lateness_s", "must be ≥ 0")

    def next_after(self, moment: float) -> float | None:
        """The first planned fire after ``moment``."""
        return next_fire(self.spec, moment, origin=self.created_at)

    def due_at(self) -> float | None:
        """When the next fire is due: its planned time plus this schedule's fixed jitter."""
        if not self.enabled:
            return None
        return self.due_at_of(self.id, self.jitter_s, self.next_fire_at)

    @staticmethod
    def due_at_of(schedule_id: str, jitter_s: float, fire_at: float | None) -> float | None:
        """When a fire planned at ``fire_at`` is due: plus the schedule's fixed jitter."""
        return None if fire_at is None else fire_at + jitter_offset(schedule_id, jitter_s)

    def to_json(self, prefix: str = "") -> dict[str, Any]:
        data = asdict(self)
        for key in ("start_at", "end_at", "next_fire_at", "created_at", "updated_at"):
            data[key] = iso(data[key])
        data["links"] = {
            "self": f"{prefix}/schedules/{self.id}",
            "fires": f"{prefix}/schedules/{self.id}/fires",
            "next": f"{prefix}/schedules/{self.id}/next",
        }
        return data


@dataclass(frozen=True, slots=True)
class FireRecord:
    """What happened to one planned fire of a schedule."""

    schedule_id: str
    fire_at: float
    outcome: str
    task_id: str | None
    recorded_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "fire_at": iso(self.fire_at),
            "outcome": self.outcome,
            "task_id": self.task_id,
            "recorded_at": iso(self.recorded_at),
        }


def idempotency_key(schedule_id: str, fire_at: float) -> str:
    """The key of the task a fire creates: one task per schedule and planned fire time, and the
    task's context reads its planned time back from it (``ctx.scheduled_for``)."""
    return f"{SCHEDULE_KEY}{schedule_id}@{fire_at!r}"


def scheduled_for(key: str | None) -> float | None:
    """The planned fire time in a key made by :func:`idempotency_key` (else None)."""
    if key is None or not key.startswith(SCHEDULE_KEY) or "@" not in key:
        return None
    try:
        return float(key.rpartition("@")[2])
    except ValueError:
        return None
