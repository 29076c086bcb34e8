"""What this process did, counted for ``GET /metrics``: counters and histograms kept in memory
and added to the store's totals about once a second (``Conveyor`` flushes them), so that a
scrape of any process reads the sums of every process on the store, on any host.

A series is ``(metric, labels, le)``: ``labels`` is the label set as sorted JSON, ``le`` is
empty for a counter and a histogram's ``_sum`` and ``_count`` (``metric_sum``,
``metric_count``), and a bucket's upper bound for its (non-cumulative) count. Counting costs a
dictionary update; a process killed without stopping loses at most its last second of counts.

The task system counts: ``conveyor_tasks_submitted{task}``,
``conveyor_tasks_finished{task, outcome}``, ``conveyor_task_retries{task}`` (an attempt that
failed and was queued again), ``conveyor_task_run_seconds{task}`` (an attempt's time) and
``conveyor_task_queue_wait_seconds{task}`` (from due to started). Services add their own.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import orjson

logger = logging.getLogger("conveyor.metrics")

Series = tuple[str, str, str]
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BOUNDS = (*(repr(b) for b in SECONDS), "+Inf")

# what each metric is (the scrape's HELP), and its kind; services describe theirs
DESCRIBED: dict[str, tuple[str, str]] = {
    "conveyor_tasks_submitted": ("counter", "Tasks submitted, by type."),
    "conveyor_tasks_finished": ("counter", "Tasks that ended, by type and outcome."),
    "conveyor_task_retries": ("counter", "Attempts that failed and were queued again."),
    "conveyor_task_run_seconds": ("histogram", "Time an attempt ran, by type."),
    "conveyor_task_queue_wait_seconds": (
        "histogram",
        "Time from a task being due to its attempt starting, by type.",
    ),
}


BY_MINUTE = "conveyor_finished_by_minute"  # {owner, outcome}, per minute
MINUTES_KEPT = 120


def describe(metric: str, kind: str, help_text: str) -> None:
    """Name a service's metric (``counter`` or ``histogram``) for the scrape."""
    DESCRIBED[metric] = (kind, help_text)


def labels_text(labels: Mapping[str, str]) -> str:
    return orjson.dumps(labels, option=orjson.OPT_SORT_KEYS).decode()


class Tally:
    """This process's counts since they were last added to the store."""

    def __init__(self) -> None:
        self._deltas: dict[Series, float] = {}
        self._labels: dict[tuple[tuple[str, str], ...], str] = {}

    def _text(self, labels: Mapping[str, str]) -> str:
        key = tuple(labels.items())
        text = self._labels.get(key)
        if text is None:
            text = self._labels[key] = labels_text(labels)
        return text

    def count(self, metric: str, labels: Mapping[str, str], n: float = 1.0) -> None:
        series = (metric, self._text(labels), "")
        self._deltas[series] = self._deltas.get(series, 0.0) + n

    def per_minute(self, metric: str, labels: Mapping[str, str], at: float) -> None:
        """Count one event in the minute of ``at`` (the series' ``le`` is the minute's start,
        epoch seconds): what the dashboard's last-hour chart reads; not exposed to /metrics,
        and forgotten after ``MINUTES_KEPT``."""
        series = (metric, self._text(labels), str(int(at // 60 * 60)))
        self._deltas[series] = self._deltas.get(series, 0.0) + 1.0

    def observe(self, metric: str, labels: Mapping[str, str], value: float) -> None:
        """One observation of a histogram with the ``SECONDS`` buckets."""
        text = self._text(labels)
        deltas = self._deltas
        bucket = (metric, text, BOUNDS[bisect.bisect_left(SECONDS, value)])
        deltas[bucket] = deltas.get(bucket, 0.0) + 1.0
        total = (metric + "_sum", text, "")
        deltas[total] = deltas.get(total, 0.0) + value
        count = (metric + "_count", text, "")
        deltas[count] = deltas.get(count, 0.0) + 1.0

    def take(self) -> dict[Series, float]:
        """The counts so far, forgotten here (give them back if they could not be stored)."""
        taken, self._deltas = self._deltas, {}
        return taken

    def give_back(self, deltas: Mapping[Series, float]) -> None:
        for series, n in deltas.items():
            self._deltas[series] = self._deltas.get(series, 0.0) + n


def rows(deltas: Mapping[Series, float]) -> Sequence[tuple[str, str, str, float]]:
    """The deltas as rows, in one order (so concurrent writers lock series alike)."""
    return sorted((metric, labels, le, n) for (metric, labels, le), n in deltas.items())


class Flusher:
    """Adds a tally's counts to the store every ``interval_s``, and a last time at stop; counts
    the store could not take are kept for the next try. A write is never cut short (a
    cancelled write could be committed and counted again)."""

    def __init__(
        self,
        tally: Tally,
        add: Callable[[Sequence[tuple[str, str, str, float]]], Awaitable[None]],
        interval_s: float = 1.0,
        prune: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._tally = tally
        self._add = add
        self._prune = prune
        self._pruned_at = 0.0
        self._interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="conveyor-tally")

    async def flush(self) -> None:
        deltas = self._tally.take()
        if not deltas:
            return
        try:
            await self._add(rows(deltas))
        except Exception:
            self._tally.give_back(deltas)
            raise
        now = time.time()
        if self._prune is not None and now - self._pruned_at > 60:
            self._pruned_at = now
            await self._prune(BY_MINUTE, str(int(now // 60 * 60 - MINUTES_KEPT * 60)))

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])
            self._task = None

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            try:
                await self.flush()
            except Exception as exc:  # kept for the next try
                if self._stopping.is_set():
                    logger.warning("the last second of metrics counts is lost: %s", exc)
                else:
                    logger.debug("metrics counts not stored yet: %s", exc)
