"""Task types for workers started with ``conveyor worker --app tests.support.worker_yard:yard``
(settings from the CONVEYOR_* environment); a test's client registers the same ones."""

import asyncio
import os
import sys
from pathlib import Path

from conveyor import Conveyor, Settings


async def limited_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def crash_worker(log: str) -> None:
    """Notes its run in ``log``, then ends the Celery pool process it runs in, as a segfault or
    the kernel's OOM killer would: no exception, no outcome, only a dead process."""
    with Path(log).open("a") as file:
        file.write(f"{os.getpid()}\n")
    os._exit(1)


def exit_worker(code: int) -> int:
    """Calls ``sys.exit`` in the pool process, as a wrapped command-line tool may."""
    sys.exit(code)


async def pid() -> int:
    return os.getpid()


async def pid_after(seconds: float) -> int:
    """Holds its worker slot ``seconds``, then names the process it ran in."""
    await asyncio.sleep(seconds)
    return os.getpid()


def register(yard: Conveyor) -> None:
    yard.task(name="limited.sleep", concurrency=2)(limited_sleep)
    yard.task(name="crash.worker", retries=1)(crash_worker)
    yard.task(name="exit.worker")(exit_worker)
    yard.task(name="pid")(pid)
    yard.task(name="rated.pid_after", rate="10/s")(pid_after)


yard = Conveyor(Settings())
register(yard)
