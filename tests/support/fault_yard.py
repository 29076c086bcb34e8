"""A mixed workload for the fault suite (``--app tests.support.fault_yard:yard``): async, thread
and process tasks with retries, timeouts and a per-type limit. Each body appends its start and
end to the log file it is given, with its process id, so a test can read every run's interval."""

import asyncio
import os
import time
from pathlib import Path

from conveyor import Conveyor, Settings, TaskContext

THREAD_LIMIT = 2


def note(log: str, event: str, ctx: TaskContext) -> None:
    at = time.clock_gettime(time.CLOCK_REALTIME)  # the host's clock, even under a skewed one
    line = f"{event} {ctx.name} {ctx.task_id} {ctx.attempt} {os.getpid()} {at:.6f}\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write per line: appends from many processes interleave
    finally:
        os.close(fd)


async def async_work(ctx: TaskContext, log: str, ms: int) -> int:
    note(log, "start", ctx)
    await asyncio.sleep(ms / 1000)
    note(log, "end", ctx)
    return ms


def thread_work(ctx: TaskContext, log: str, ms: int) -> int:
    note(log, "start", ctx)
    time.sleep(ms / 1000)
    note(log, "end", ctx)
    return ms


def process_work(ctx: TaskContext, log: str, ms: int) -> int:
    note(log, "start", ctx)
    deadline = time.monotonic() + ms / 1000
    while time.monotonic() < deadline:
        pass
    note(log, "end", ctx)
    return ms


async def flaky(ctx: TaskContext, log: str) -> int:
    note(log, "start", ctx)
    if ctx.attempt == 1:
        raise ConnectionError("the first attempt always fails")
    note(log, "end", ctx)
    return ctx.attempt


async def too_slow(ctx: TaskContext, log: str) -> None:
    note(log, "start", ctx)
    await asyncio.sleep(5)


def register(yard: Conveyor) -> None:
    yard.task(name="fault.async", retries=3, backoff_base_s=0.05)(async_work)
    yard.task(name="fault.thread", retries=3, backoff_base_s=0.05, concurrency=THREAD_LIMIT)(
        thread_work
    )
    yard.task(name="fault.process", executor="process", retries=3, backoff_base_s=0.05)(
        process_work
    )
    yard.task(name="fault.flaky", retries=2, backoff_base_s=0.05, retry_on=(ConnectionError,))(
        flaky
    )
    yard.task(name="fault.too_slow", timeout_s=0.3)(too_slow)


def log_path(data_dir: str | Path) -> str:
    return str(Path(data_dir) / "runs.log")


yard = Conveyor(Settings())
register(yard)
