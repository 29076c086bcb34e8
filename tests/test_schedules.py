"""Periodic schedules: exactly one task per planned fire whatever the number of processes, the
planned time given to the task, bad schedules refused naming the field, and the DST policy."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from conveyor import Conveyor, Settings, TaskContext
from conveyor.cron import Spec, describe
from conveyor.errors import InvalidArguments, TaskTypeError

pytestmark = pytest.mark.anyio

SEEN: list[tuple[str, float | None]] = []


class Ticks:
    """Set ``done`` once ``SEEN`` holds ``wanted`` entries (a test waits on it, not a clock)."""

    wanted = 0
    done: anyio.Event | None = None


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str | None:
    """The store schedules are kept in: the SQLite file (None) or a PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres").create_database())


def make_yard(data_dir: Path, database: str | None = None, **declare: object) -> Conveyor:
    yard = Conveyor(Settings(data_dir=data_dir, database_url=database, poll_s=0.05))

    @yard.task(name="sched.tick")
    async def tick(ctx: TaskContext, label: str) -> float | None:
        planned = ctx.scheduled_for
        SEEN.append((label, None if planned is None else planned.timestamp()))
        if Ticks.done is not None and len(SEEN) >= Ticks.wanted:
            Ticks.done.set()
        return None if planned is None else planned.timestamp()

    if declare:
        yard.schedule("sched.tick", name="every-second", args={"label": "x"}, **declare)  # type: ignore[arg-type]
    return yard


async def test_two_processes_fire_each_planned_time_once(
    tmp_path: Path, database: str | None
) -> None:
    """Two instances on one store, each running the scheduler: an every-second schedule makes
    one task per second, no gap, none twice; each task knows its planned time."""
    first = make_yard(tmp_path, database, every_s=1)
    second = make_yard(tmp_path, database, every_s=1)
    Ticks.wanted, Ticks.done = len(SEEN) + 5, anyio.Event()
    async with first, second:
        schedule = await first.schedules.store.by_name("every-second", owner="")
        assert schedule is not None
        with anyio.fail_after(30):  # until five planned seconds have run
            await Ticks.done.wait()
        Ticks.done = None
        fires = await first.schedules.fires(schedule.id, owner="")
    planned = sorted(f.fire_at for f in fires)
    assert len(planned) >= 4, fires
    assert all(f.outcome == "fired" and f.task_id for f in fires), fires
    steps = {round(b - a, 6) for a, b in itertools.pairwise(planned)}
    assert steps == {1.0}, f"one fire per second, no gap: {planned}"
    async with make_yard(tmp_path, database) as reader:
        for fire in fires:
            assert fire.task_id is not None
            task = await reader.wait(fire.task_id, timeout_s=10)
            assert task.status.value == "completed"
            assert task.result == pytest.approx(fire.fire_at, abs=1e-5), "its planned time"
        tasks = await reader.store.list_tasks(owner=None, limit=1000)
    assert len(tasks) == len(fires) == len({f.task_id for f in fires}), "one task per fire"


async def test_bad_schedules_are_refused_naming_the_field(tmp_path: Path) -> None:
    yard = make_yard(tmp_path)
    cases = {
        "cron": {"cron": "not a cron"},
        "timezone": {"cron": "* * * * *", "timezone": "Mars/Olympus"},
        "every_s": {"every_s": 0.5},
    }
    for field, fields in cases.items():
        with pytest.raises(TaskTypeError, match=field):
            yard.schedule("sched.tick", name=f"bad-{field}", args={"label": "x"}, **fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidArguments, match="cron"):
        Spec(cron="0 0 31 2 *").check()
    async with yard:
        with pytest.raises(InvalidArguments, match="schedule:"):  # a fire's key, not a caller's
            await yard.submit("sched.tick", {"label": "x"}, idempotency_key="schedule:x@1.0")
        assert await yard.list() == []
        with pytest.raises(InvalidArguments) as refused:
            await yard.schedules.create(
                "wrong-args", {"task": "sched.tick", "args": {"label": 5}, "every_s": 60}, owner=""
            )
        assert refused.value.details[0]["loc"][:3] == ["body", "args", "label"]
        with pytest.raises(InvalidArguments, match="task"):
            await yard.schedules.create("nobody", {"task": "no.such", "every_s": 60}, owner="")


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("Europe/Oslo", "2026-03-29"),
        ("Europe/Oslo", "2026-10-25"),
        ("America/Santiago", "2026-04-05"),
        ("America/Santiago", "2026-09-06"),
        ("Australia/Lord_Howe", "2026-04-05"),
        ("Australia/Lord_Howe", "2026-10-04"),
    ],
)
def test_a_daily_job_fires_once_on_dst_days(zone: str, day: str) -> None:
    """``30 2 * * *`` (and ``0 2``, ``30 1``, ``0 0``) fire once on each local day around a
    change of the clocks, in a northern zone, a southern one, and one with a 30-minute shift."""
    tz = ZoneInfo(zone)
    change = date.fromisoformat(day)
    days = [change - timedelta(days=1), change, change + timedelta(days=1)]
    start = datetime.combine(days[0], dtime(), tz).timestamp() - 1
    end = datetime.combine(days[-1] + timedelta(days=1), dtime(), tz).timestamp()
    for expression in ("30 2 * * *", "0 2 * * *", "30 1 * * *", "0 0 * * *"):
        fires = []
        for moment in Spec(cron=expression, timezone=zone).fires(start, origin=0):
            if moment >= end:
                break
            fires.append(moment)
        local = [datetime.fromtimestamp(m, tz).date() for m in fires]
        assert local == days, (expression, zone, [describe(m, zone) for m in fires])


async def test_missed_fires_overlap_and_trigger(tmp_path: Path, database: str | None) -> None:
    """Driven with an explicit "now" (no workers, no waiting): after downtime ``skip`` records
    the missed fires and runs nothing, ``run_once`` runs the latest once; ``skip_if_running``
    records a fire whose previous task is still queued as skipped; a trigger runs now and
    leaves the planned fires alone."""
    yard = make_yard(tmp_path, database)
    yard.run_workers = False
    async with yard:
        t0 = await yard.schedules.store.now()
        fields = {"task": "sched.tick", "args": {"label": "m"}, "every_s": 60, "start_at": t0}
        skip = await yard.schedules.create("skip", fields, owner="")
        once = await yard.schedules.create("once", {**fields, "misfire": "run_once"}, owner="")
        busy = await yard.schedules.create(
            "busy", {**fields, "overlap": "skip_if_running"}, owner=""
        )
        # ten minutes of downtime: fires at t0+60 … t0+600 were missed
        await yard.schedules.fire_due(t0 + 600.5)
        skipped = await yard.schedules.fires(skip.id, owner="")
        assert len(skipped) == 10 and {f.outcome for f in skipped} == {"missed"}
        assert not any(f.task_id for f in skipped)
        ran = await yard.schedules.fires(once.id, owner="")
        assert [f.outcome for f in ran] == ["fired"] + ["missed"] * 9, "latest first"
        assert ran[0].fire_at == pytest.approx(t0 + 600)
        after = await yard.schedules.get(skip.id, owner="")
        assert after.next_fire_at == pytest.approx(t0 + 660), "goes on from now"
        # on time twice: the second fire finds the first one's task still queued (no workers)
        await yard.schedules.fire_due(t0 + 660.5)
        await yard.schedules.fire_due(t0 + 720.5)
        history = await yard.schedules.fires(busy.id, owner="")
        assert [f.outcome for f in history[:2]] == ["skipped_overlap", "fired"]
        triggered = await yard.schedules.trigger(skip.id, owner="")
        outcomes = {f.task_id: f.outcome for f in await yard.schedules.fires(skip.id, owner="")}
        assert outcomes[triggered.id] == "triggered"
        assert (await yard.schedules.get(skip.id, owner="")).next_fire_at == pytest.approx(
            t0 + 780
        ), "a trigger leaves the planned fires alone"


async def test_a_change_saved_over_a_fire_neither_repeats_it_nor_sticks(
    tmp_path: Path, database: str | None
) -> None:
    """A change read before a fire and saved after it puts the fired time back as the next
    fire: the next try creates nothing and moves the schedule on. A pause saved while a fire is
    being recorded stands: the fire does not make the schedule due again."""
    yard = make_yard(tmp_path, database)
    yard.run_workers = False
    async with yard:
        store = yard.schedules.store
        t0 = await store.now()
        fields = {"task": "sched.tick", "args": {"label": "c"}, "every_s": 60, "start_at": t0}
        schedule = await yard.schedules.create("changed", fields, owner="")
        stale = await yard.schedules.get(schedule.id, owner="")
        assert await yard.schedules.fire_due(t0 + 60.5) == 1
        await store.save(stale)  # e.g. a PATCH of its arguments, read before the fire
        assert await yard.schedules.fire_due(t0 + 61) == 0, "the fired time is not fired again"
        moved = await yard.schedules.get(schedule.id, owner="")
        assert moved.next_fire_at == pytest.approx(t0 + 120), "and the schedule goes on"
        assert await yard.schedules.fire_due(t0 + 120.5) == 1
        fires = await yard.schedules.fires(schedule.id, owner="")
        assert [(f.fire_at - t0, f.outcome) for f in fires] == [(120, "fired"), (60, "fired")]

        current = await yard.schedules.get(schedule.id, owner="")  # as a scheduler reads it
        await yard.schedules.update(schedule.id, {"enabled": False}, owner="")  # then a pause
        recorded = await store.fire(
            current,
            t0 + 180,
            "missed",
            task=None,
            missed=[],
            next_fire_at=t0 + 240,
            max_queued=None,
        )
        assert recorded == ("missed", None)
        assert await store.due(t0 + 10_000) == [], "the pause stands: nothing is due"
        assert not (await yard.schedules.get(schedule.id, owner="")).enabled
