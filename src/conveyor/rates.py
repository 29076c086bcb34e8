"""Rate limits of task types: at most ``count`` starts in any window of ``period_s`` seconds.

``"20/s"``, ``"100/m"``, ``"1000/h"`` (also ``second``, ``minute``, ``hour``, and a multiple:
``"5/10s"``). The store keeps the recent start times of each limited type and lets a task start
only while fewer than ``count`` started within the last ``period_s`` (a sliding window, on the
store's clock): the bound holds in every window, across every worker sharing the store, with no
burst at a window's edge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TaskTypeError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(
    r"^\s*(?P<count>[0-9]+)\s*/\s*(?P<every>[0-9]*)\s*"
    r"(?P<unit>s|sec|second|m|min|minute|h|hr|hour)s?\s*$"
)
MAX_COUNT = 100_000


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    period_s: float

    def __str__(self) -> str:
        for unit, seconds in sorted(_UNITS.items(), key=lambda item: -item[1]):
            if self.period_s % seconds == 0:
                every = int(self.period_s // seconds)
                return f"{self.count}/{'' if every == 1 else every}{unit}"
        return f"{self.count}/{self.period_s:g}s"  # pragma: no cover - parse makes whole units


def parse_rate(text: str) -> Rate:
    """``"20/s"`` → ``Rate(20, 1.0)``; :class:`TaskTypeError` naming what is wrong."""
    found = _RATE.match(text)
    if found is None:
        raise TaskTypeError(
            f"rate {text!r}: write a count per unit, such as '20/s', '100/m' or '5/10s'"
        )
    count = int(found["count"])
    every = int(found["every"] or 1)
    if not 1 <= count <= MAX_COUNT or every < 1:
        raise TaskTypeError(f"rate {text!r}: the count must be 1 to {MAX_COUNT}, per ≥ 1 unit")
    return Rate(count, every * _UNITS[found["unit"][0]])


_DURATION = re.compile(r"^\s*(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float | None:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"`` or ``"3600"`` (seconds) → seconds; ``"none"``
    → None (keep for ever). ``ValueError`` naming the accepted forms."""
    if text.strip().lower() in ("none", "never", "forever"):
        return None
    found = _DURATION.match(text.lower())
    if found is None or float(found["n"]) <= 0:
        raise ValueError(f"{text!r}: write a positive duration such as 7d, 12h, 30m, 90s, or none")
    return float(found["n"]) * _DURATION_UNITS[found["unit"] or "s"]
