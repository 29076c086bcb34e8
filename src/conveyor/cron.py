"""When a schedule fires: cron expressions (cronsim) or fixed intervals, in an IANA time zone.

Pure functions of a spec and an instant; every instant is epoch seconds (UTC).

Daylight saving time, for cron expressions (cronsim's rules, those of Debian's cron): a job at
fixed hours fires once on every local day. In a gap (the clocks jump forward over its time) it
fires at the first instant after the gap; in a fold (the clocks fall back over its time) it fires
at the first of the two instants. A job whose hour field is a wildcard (``*/15 * * * *``) fires
at every real instant its minutes match, so twice in the repeated hour and not in the skipped one.
An interval (``every_s``) counts real seconds from ``start_at`` (or the schedule's creation) and
knows nothing of local time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from .errors import InvalidArguments

# a cron expression that matches nothing for this long is refused (``0 0 31 2 *``)
_HORIZON = timedelta(days=366 * 5)


def invalid(field: str, message: str) -> InvalidArguments:
    """A ``422`` naming the field of the schedule that was wrong."""
    return InvalidArguments(
        f"{field}: {message}", details=[{"loc": ["body", field], "msg": message, "type": "value"}]
    )


def zone(name: str) -> ZoneInfo:
    try:
        if not name or name.startswith(("/", ".")) or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        message = f"unknown time zone {name!r} (an IANA name such as UTC or Europe/Oslo)"
        raise invalid("timezone", message) from None


@dataclass(frozen=True, slots=True)
class Spec:
    """What decides a schedule's fire times."""

    cron: str | None = None
    every_s: float | None = None
    timezone: str = "UTC"
    start_at: float | None = None
    end_at: float | None = None

    def check(self) -> None:
        """Raise a ``422`` naming the field when this spec cannot fire."""
        if (self.cron is None) == (self.every_s is None):
            raise invalid("cron", "give either cron or every_s")
        tz = zone(self.timezone)
        if self.every_s is not None and not self.every_s >= 1:
            raise invalid("every_s", "must be at least 1 second")
        if self.start_at is not None and self.end_at is not None and self.end_at <= self.start_at:
            raise invalid("end_at", "must be after start_at")
        if self.cron is not None:
            if len(self.cron.split()) not in (5, 6):
                raise invalid("cron", "5 fields (minute hour day month weekday), or 6 with seconds")
            start = datetime.now(tz)
            try:
                first = next(CronSim(self.cron, start))
            except (CronSimError, StopIteration, ValueError) as exc:
                raise invalid("cron", f"cannot parse {self.cron!r}: {exc}") from None
            if first - start > _HORIZON:
                raise invalid("cron", f"{self.cron!r} never fires")

    def fires(self, after: float, *, origin: float) -> Iterator[float]:
        """Planned fire times strictly after ``after``, within ``start_at``/``end_at``;
        ``origin`` anchors an interval when ``start_at`` is not set."""
        lower = after if self.start_at is None else max(after, self.start_at - 1e-6)
        if self.every_s is not None:
            anchor = self.start_at if self.start_at is not None else origin
            steps = max(int((lower - anchor) // self.every_s) + 1, 0)
            times: Iterator[float] = (anchor + (steps + i) * self.every_s for i in _count())
        else:
            assert self.cron is not None
            tz = zone(self.timezone)
            start = datetime.fromtimestamp(lower, UTC).astimezone(tz)
            if start.microsecond:
                start = start.replace(microsecond=0)
            times = (moment.timestamp() for moment in CronSim(self.cron, start))
        for moment in times:
            if moment <= after:
                continue
            if self.end_at is not None and moment > self.end_at:
                return
            yield moment


def _count() -> Iterator[int]:
    n = 0
    while True:
        yield n
        n += 1


def next_fire(spec: Spec, after: float, *, origin: float) -> float | None:
    """The first planned fire time after ``after`` (None: the schedule has ended)."""
    return next(spec.fires(after, origin=origin), None)


def jitter_offset(schedule_id: str, jitter_s: float) -> float:
    """A fixed offset in ``[0, jitter_s)`` for one schedule, so that many schedules with the same
    times do not all fire in the same millisecond."""
    if jitter_s <= 0:
        return 0.0
    digest = hashlib.blake2b(schedule_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * jitter_s


def describe(moment: float, timezone: str) -> dict[str, object]:
    """A fire time for people: UTC, local, and whether it falls at a DST change (``gap``: the
    local time it was planned for did not exist; ``fold``: the local time happens twice)."""
    tz = zone(timezone)
    local = datetime.fromtimestamp(moment, tz)
    naive = local.replace(tzinfo=None)
    other = naive.replace(fold=1 - local.fold).replace(tzinfo=tz)
    fold = other.utcoffset() != local.utcoffset()
    before = datetime.fromtimestamp(moment - 1, tz)
    gap = (local.utcoffset() or timedelta()) > (before.utcoffset() or timedelta()) and (
        local.minute == 0 and local.second == 0
    )
    return {
        "utc": datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z"),
        "local": local.isoformat(),
        "dst_gap": gap,
        "dst_fold": fold,
    }
