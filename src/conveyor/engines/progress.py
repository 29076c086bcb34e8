"""Coalesced progress: a task may report as often as it likes; the store sees at most one write
per interval, always the latest value, and the last report is never lost."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

PROGRESS_INTERVAL_S = 0.1


class ProgressWriter:
    """One running task's progress reports, written through ``write`` (on the event loop)."""

    def __init__(
        self,
        write: Callable[[float, str | None], Awaitable[None]],
        spawn: Callable[[Awaitable[Any]], object],
        *,
        interval_s: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self._write = write
        self._spawn = spawn
        self._interval_s = interval_s
        self._loop = asyncio.get_running_loop()
        self._latest: tuple[float, str | None] = (0.0, None)
        self._future: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_write = -interval_s

    def report(self, percent: float, message: str | None) -> asyncio.Future[None]:
        """Record a report (on the loop thread); the future resolves once it is stored."""
        self._latest = (percent, message)
        if self._future is None:
            self._future = self._loop.create_future()
            delay = self._last_write + self._interval_s - self._loop.time()
            if delay <= 0:
                self._spawn(self._flush())
            else:
                self._timer = self._loop.call_later(delay, self._spawn_flush)
        return self._future

    def _spawn_flush(self) -> None:
        self._timer = None
        self._spawn(self._flush())

    async def _flush(self) -> None:
        future, self._future = self._future, None
        self._last_write = self._loop.time()
        try:
            await self._write(*self._latest)
        finally:
            if future is not None and not future.done():
                future.set_result(None)

    def close(self) -> None:
        """The task ended: drop a pending write (its outcome supersedes it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None
