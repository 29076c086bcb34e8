"""Periodic schedules: declared in code or made over HTTP, fired by every process with workers.

No leader: each process with workers runs :class:`Scheduler`, which looks for due schedules and
tries to record each due fire; the store inserts the fire row keyed ``(schedule, planned time)``
in the same transaction as its task, so only one process's try creates anything
(``ScheduleStore.fire``). The task's idempotency key names the schedule and the planned time
(``schedule_record.idempotency_key``), and ``ctx.scheduled_for`` reads it back.

Missed fires (the processes were down, or the fire is later than ``max_lateness_s``): with
``misfire="skip"`` they are recorded ``missed`` and nothing runs; with ``misfire="run_once"``
the latest of them runs once, however late, and the others are recorded ``missed``. At most
``MAX_MISSED`` missed fires are recorded per catch-up; the schedule then goes on from now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any, Protocol

from .cron import jitter_offset
from .engines.base import Engine
from .errors import (
    ConfigurationError,
    ConveyorError,
    InvalidArguments,
    ScheduleConflict,
    ScheduleNotFound,
    TaskTypeError,
)
from .ids import uuid7
from .record import TaskRecord
from .schedule_record import (
    FIRED,
    MISSED,
    TRIGGERED,
    FireRecord,
    ScheduleRecord,
    idempotency_key,
)
from .settings import Settings
from .store.base import ScheduleStore, Store
from .tally import Tally
from .task import UNSET, TaskType, new_record


class ScheduleHost(Protocol):
    """What schedules need of :class:`~conveyor.core.Conveyor`."""

    settings: Settings
    tally: Tally

    @property
    def store(self) -> Store: ...

    @property
    def engine(self) -> Engine | None: ...

    def task_type(self, name: str, *, public_only: bool = False) -> TaskType[Any, Any]: ...


logger = logging.getLogger("conveyor.schedules")

MAX_MISSED = 100
IDLE_S = 1.0  # the longest a scheduler sleeps: schedules made by other processes are seen by then
EDITABLE = (
    "task",
    "args",
    "cron",
    "every_s",
    "timezone",
    "start_at",
    "end_at",
    "jitter_s",
    "misfire",
    "max_lateness_s",
    "overlap",
    "enabled",
)


class Schedules:
    """The schedules of one :class:`~conveyor.core.Conveyor` (``yard.schedules``)."""

    def __init__(self, yard: ScheduleHost) -> None:
        self._yard = yard
        self.declared: dict[str, dict[str, Any]] = {}

    @property
    def store(self) -> ScheduleStore:
        return self._yard.store.schedules()

    # declared in code -----------------------------------------------------------------------

    def declare(self, task: str, *, name: str | None, **fields: Any) -> None:
        """A schedule of the task type ``task`` from code (``@yard.periodic``,
        ``yard.schedule``), checked now (``TaskTypeError`` naming it) and saved at start."""
        name = name or task
        fields = {"task": task, **fields}
        try:
            if name in self.declared:
                raise ConfigurationError(f"a schedule named {name!r} is declared twice")
            self._build(name, fields, owner="", now=time.time()).check()
        except ConveyorError as exc:
            raise TaskTypeError(f"schedule {name!r}: {exc.message}") from exc
        self.declared[name] = fields

    async def sync_declared(self) -> None:
        """Save the schedules declared in code, by name; disable those no longer declared."""
        store = self.store
        now = await store.now()
        for name, fields in self.declared.items():
            current = await store.by_name(name, owner="")
            wanted = self._build(name, fields, owner="", now=now, from_code=True)
            self._validate_args(wanted)
            if current is None:
                wanted.next_fire_at = wanted.next_after(now)
                try:
                    await store.create(wanted)
                    continue
                except ScheduleConflict:  # another process starting now saved it first
                    current = await store.by_name(name, owner="")
                    assert current is not None
            spec_changed = any(
                getattr(current, key) != getattr(wanted, key)
                for key in ("cron", "every_s", "timezone", "start_at", "end_at")
            )
            updated = replace(
                current,
                **{key: getattr(wanted, key) for key in EDITABLE if key != "enabled"},
                from_code=True,
                enabled=current.enabled or not current.from_code,
                updated_at=now,
            )
            if spec_changed or updated.next_fire_at is None:
                updated.next_fire_at = updated.next_after(now)
            if updated != current:
                await store.save(updated)
        for schedule in await store.list_schedules(owner=""):
            if schedule.from_code and schedule.name not in self.declared and schedule.enabled:
                await store.save(replace(schedule, enabled=False, updated_at=now))
                logger.info("schedule %r is no longer declared in code: disabled", schedule.name)

    # made over HTTP (or by library calls) ---------------------------------------------------

    async def create(
        self, name: str, fields: dict[str, Any], *, owner: str, public_only: bool = False
    ) -> ScheduleRecord:
        """A new schedule; ``public_only`` (the HTTP API) refuses internal task types."""
        now = await self.store.now()
        record = self._build(name, fields, owner=owner, now=now)
        record.check()
        self._validate_args(record, public_only=public_only)
        record.next_fire_at = record.next_after(now)
        return await self.store.create(record)

    async def update(
        self,
        schedule_id: str,
        changes: dict[str, Any],
        *,
        owner: str | None,
        public_only: bool = False,
    ) -> ScheduleRecord:
        """Change the fields in ``changes``; a new time spec (or a resume) plans from now."""
        current = await self.store.get(schedule_id, owner=owner)
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise InvalidArguments(f"cannot change {', '.join(sorted(unknown))}")
        if "cron" in changes and changes["cron"] is not None:
            changes.setdefault("every_s", None)
        if "every_s" in changes and changes["every_s"] is not None:
            changes.setdefault("cron", None)
        now = await self.store.now()
        updated = replace(current, **changes, updated_at=now)
        updated.check()
        self._validate_args(updated, public_only=public_only)
        if any(k in changes for k in ("cron", "every_s", "timezone", "start_at", "end_at")) or (
            changes.get("enabled") and not current.enabled
        ):
            updated.next_fire_at = updated.next_after(now)
        return await self.store.save(updated)

    async def get(self, schedule_id: str, *, owner: str | None) -> ScheduleRecord:
        return await self.store.get(schedule_id, owner=owner)

    async def owner_of(self, schedule_id: str, *, owner: str | None) -> str | None:
        """The tenant of a schedule ``owner`` can see (None: there is none)."""
        try:
            return (await self.store.get(schedule_id, owner=owner)).owner
        except ScheduleNotFound:
            return None

    async def list_schedules(self, *, owner: str | None) -> list[ScheduleRecord]:
        return await self.store.list_schedules(owner=owner)

    async def delete(self, schedule_id: str, *, owner: str | None) -> None:
        await self.store.delete(schedule_id, owner=owner)

    async def fires(
        self, schedule_id: str, *, owner: str | None, limit: int = 50, before: float | None = None
    ) -> list[FireRecord]:
        await self.store.get(schedule_id, owner=owner)
        return await self.store.fires(schedule_id, limit=limit, before=before)

    async def next_fires(self, schedule_id: str, *, owner: str | None, count: int) -> list[float]:
        return upcoming(await self.store.get(schedule_id, owner=owner), count)

    async def trigger(self, schedule_id: str, *, owner: str | None) -> TaskRecord:
        """One run now, recorded as ``triggered``; the planned fires are left alone."""
        schedule = await self.store.get(schedule_id, owner=owner)
        fire_at = await self.store.now()
        task = self._task(schedule, fire_at)
        done = await self.store.fire(
            schedule,
            fire_at,
            TRIGGERED,
            task=task,
            missed=[],
            next_fire_at=None,
            max_queued=self._yard.settings.max_queued,
        )
        if done is None or done[1] is None:
            raise ScheduleNotFound(f"no schedule with id {schedule_id}")
        self._submitted(done[1])
        return done[1]

    # firing ---------------------------------------------------------------------------------

    async def fire_due(self, now: float) -> int:
        """Try every due fire once; how many tasks this process created."""
        created = 0
        for schedule in await self.store.due(now):
            try:
                created += await self._fire(schedule, now)
            except ConveyorError as exc:
                logger.error("schedule %r did not fire: %s", schedule.name, exc)
        return created

    async def _fire(self, schedule: ScheduleRecord, now: float) -> int:
        first = schedule.next_fire_at
        assert first is not None
        planned = [first]
        for moment in schedule.spec.fires(first, origin=schedule.created_at):
            if moment > now or len(planned) >= MAX_MISSED:
                break
            planned.append(moment)
        next_fire_at = schedule.next_after(max(now, planned[-1]))
        offset = jitter_offset(schedule.id, schedule.jitter_s)
        if len(planned) == 1 and now - first - offset <= schedule.max_lateness_s:
            fire_at, missed, runs = first, [], True  # on time
        elif schedule.misfire == "run_once":
            fire_at, missed, runs = planned[-1], planned[:-1], True
        else:
            fire_at, missed, runs = first, planned[1:], False
        task = self._task(schedule, fire_at) if runs else None
        outcome = FIRED if task is not None else MISSED
        done = await self.store.fire(
            schedule,
            fire_at,
            outcome,
            task=task,
            missed=missed,
            next_fire_at=next_fire_at,
            max_queued=self._yard.settings.max_queued,
        )
        if done is None or done[1] is None:
            return 0
        self._submitted(done[1])
        return 1

    def _task(self, schedule: ScheduleRecord, fire_at: float) -> tuple[TaskRecord, str] | None:
        """The task of one fire (None, logged, when its type or arguments no longer fit)."""
        try:
            task_type = self._yard.task_type(schedule.task)
            args = task_type.validate(schedule.args)
            return new_record(
                task_type,
                args,
                owner=schedule.owner,
                priority=None,
                delay_s=None,
                timeout_s=UNSET,
                idempotency_key=idempotency_key(schedule.id, fire_at),
                task_id=None,
            )
        except ConveyorError as exc:
            logger.error("schedule %r cannot make its task: %s", schedule.name, exc)
            return None

    def _submitted(self, record: TaskRecord) -> None:
        self._yard.tally.count("conveyor_tasks_submitted", {"task": record.name})
        engine = self._yard.engine
        if engine is not None:
            engine.submitted(record)

    # helpers --------------------------------------------------------------------------------

    def _build(
        self,
        name: str,
        fields: dict[str, Any],
        *,
        owner: str,
        now: float,
        from_code: bool = False,
    ) -> ScheduleRecord:
        if not name or len(name) > 200:
            raise InvalidArguments(
                "name: 1 to 200 characters",
                details=[{"loc": ["body", "name"], "msg": "1 to 200 characters", "type": "value"}],
            )
        known = {key: fields[key] for key in EDITABLE if key in fields}
        return ScheduleRecord(
            id=uuid7(),
            name=name,
            owner=owner,
            from_code=from_code,
            created_at=now,
            updated_at=now,
            **{"args": {}, **known},
        )

    def _validate_args(self, record: ScheduleRecord, *, public_only: bool = False) -> None:
        """The schedule's arguments must pass its task type's schema now (``422`` naming them)."""
        try:
            task_type = self._yard.task_type(record.task, public_only=public_only)
        except ConveyorError:
            raise InvalidArguments(
                f"task: no task type named {record.task!r}",
                details=[{"loc": ["body", "task"], "msg": "unknown task type", "type": "value"}],
            ) from None
        try:
            task_type.validate(record.args)
        except InvalidArguments as exc:
            exc.details = [
                {
                    **d,
                    "loc": [
                        "body",
                        *(d["loc"] if d["loc"][:1] == ["args"] else ["args", *d["loc"]]),
                    ],
                }
                for d in exc.details
            ]
            raise


def upcoming(schedule: ScheduleRecord, count: int) -> list[float]:
    """The schedule's next ``count`` planned fire times (none while it is paused or ended)."""
    if not schedule.enabled or schedule.next_fire_at is None:
        return []
    found = [schedule.next_fire_at]
    for moment in schedule.spec.fires(schedule.next_fire_at, origin=schedule.created_at):
        if len(found) >= count:
            break
        found.append(moment)
    return found[:count]


class Scheduler:
    """Fires due schedules in this process until stopped."""

    def __init__(self, schedules: Schedules) -> None:
        self._schedules = schedules
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="conveyor-scheduler")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            next_due: float | None = None
            now = time.time()
            try:
                now = await self._schedules.store.now()
                await self._schedules.fire_due(now)
                next_due = await self._schedules.store.next_due()
            except ConveyorError as exc:
                logger.error("schedules not fired: %s", exc)
            except Exception:  # the scheduler must outlive any one failure
                logger.exception("schedules not fired")
            delay = IDLE_S if next_due is None else min(max(next_due - now, 0), IDLE_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
