"""Run `conveyor` with its wall clock skewed: ``python -m tests.support.skewed_clock worker …``
with ``CONVEYOR_TEST_CLOCK_SKEW_S`` set (seconds, negative for a clock behind).

``time.time``, ``time.time_ns`` and ``datetime.now``/``utcnow``/``today`` are shifted before
Conveyor, Celery or kombu is imported, so every Python-level reading of the wall clock in the
process (and in the prefork pool processes it forks) is off by the skew, as on a host whose clock
drifted. Monotonic clocks are left alone, as they are by a drifting wall clock."""

from __future__ import annotations

import datetime
import os
import runpy
import sys
import time

SKEW_S = float(os.environ["CONVEYOR_TEST_CLOCK_SKEW_S"])
_SKEW = datetime.timedelta(seconds=SKEW_S)
_time, _time_ns = time.time, time.time_ns


def _skewed_time() -> float:
    return _time() + SKEW_S


def _skewed_time_ns() -> int:
    return _time_ns() + int(SKEW_S * 1_000_000_000)


class _SkewedDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> _SkewedDatetime:
        return super().now(tz) + _SKEW

    @classmethod
    def utcnow(cls) -> _SkewedDatetime:
        return super().utcnow() + _SKEW

    @classmethod
    def today(cls) -> _SkewedDatetime:
        return cls.now()


time.time = _skewed_time
time.time_ns = _skewed_time_ns
datetime.datetime = _SkewedDatetime  # type: ignore[misc]

if __name__ == "__main__":
    sys.argv[0] = "conveyor"
    runpy.run_module("conveyor", run_name="__main__", alter_sys=True)
