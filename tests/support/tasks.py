"""Task functions used by the tests (module level, so child processes can import them)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from pydantic import BaseModel

from conveyor import Conveyor, TaskContext

# Gates let a test hold a task at a known point and release it, instead of sleeping.
ASYNC_GATES: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
THREAD_GATES: dict[str, threading.Event] = defaultdict(threading.Event)
FAILURES: dict[str, int] = defaultdict(int)
ACTIVE = {"now": 0, "max": 0}


class Point(BaseModel):
    x: int
    y: int


async def echo(ctx: TaskContext, value: Any) -> Any:
    return value


async def gated(ctx: TaskContext, key: str) -> str:
    ACTIVE["now"] += 1  # counted from the first step: a task is running once it starts
    ACTIVE["max"] = max(ACTIVE["max"], ACTIVE["now"])
    try:
        await ctx.progress(50, "waiting at the gate")
        await ASYNC_GATES[key].wait()
    finally:
        ACTIVE["now"] -= 1
    return key


def thread_gated(ctx: TaskContext, key: str) -> str:
    ctx.progress(10, "thread waiting")
    while not THREAD_GATES[key].wait(0.01):
        ctx.raise_if_cancelled()
    return key


async def flaky(ctx: TaskContext, key: str, failures: int) -> int:
    """Fails ``failures`` times for ``key``, then returns the attempt number."""
    if FAILURES[key] < failures:
        FAILURES[key] += 1
        raise ConnectionError(f"transient failure {FAILURES[key]}")
    return ctx.attempt


async def wrong_kind(ctx: TaskContext) -> None:
    raise ValueError("not retried")


async def boom(ctx: TaskContext, message: str) -> None:
    raise ValueError(message)


async def unserialisable(ctx: TaskContext) -> Any:
    return object()


async def model_result(ctx: TaskContext, point: Point) -> Point:
    return Point(x=point.y, y=point.x)


def sync_add(ctx: TaskContext, a: int, b: int) -> int:
    return a + b


def cpu_square(ctx: TaskContext, n: int) -> int:
    ctx.progress(50, "squaring")
    return n * n


def cpu_forever(ctx: TaskContext) -> None:
    ctx.progress(1, "spinning")
    while True:
        time.monotonic()


def cpu_pid(ctx: TaskContext) -> int:
    import os

    return os.getpid()


def cpu_sleep(ctx: TaskContext, seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def cpu_crash(ctx: TaskContext) -> None:
    import os

    os._exit(3)


def exits(ctx: TaskContext, how: str) -> str:
    """Ends the way a careless task can: ``sys.exit``, an argparse refusal, a Ctrl-C."""
    if how == "exit":
        sys.exit(2)
    if how == "argparse":
        parser = argparse.ArgumentParser(prog="tool", exit_on_error=True)
        parser.add_argument("--count", type=int, required=True)
        parser.parse_args(["--count", "many"])
    if how == "keyboard":
        raise KeyboardInterrupt
    return how


async def async_exits(ctx: TaskContext, how: str) -> str:
    if how == "cancelled":  # cancels and awaits a helper of its own: CancelledError escapes
        helper = asyncio.ensure_future(asyncio.sleep(3600))
        await asyncio.sleep(0)
        helper.cancel()
        await helper
    if how == "exit":
        sys.exit("stop everything")
    return exits(ctx, how)


def fail_after_gate(ctx: TaskContext, key: str) -> None:
    """Waits for its gate without looking at cancellation, then fails retryably."""
    THREAD_GATES[key].wait(30)
    raise ConnectionError("failed after the cancel was requested")


THREAD_ACTIVE = {"now": 0, "max": 0}
_THREAD_ACTIVE_LOCK = threading.Lock()


def thread_stuck(ctx: TaskContext, key: str) -> str:
    """Blocks until its gate opens, deaf to cancellation (a socket read without a timeout)."""
    with _THREAD_ACTIVE_LOCK:
        THREAD_ACTIVE["now"] += 1
        THREAD_ACTIVE["max"] = max(THREAD_ACTIVE["max"], THREAD_ACTIVE["now"])
    try:
        THREAD_GATES[key].wait(60)
    finally:
        with _THREAD_ACTIVE_LOCK:
            THREAD_ACTIVE["now"] -= 1
    return key


def logs_sync(ctx: TaskContext, fail_first: bool) -> str:
    """Logs through the logging module (as library code does) and ``ctx.log``, on a thread."""
    logging.getLogger("tests.library").warning("library line on attempt %d", ctx.attempt)
    ctx.log.info("ctx line on attempt %d", ctx.attempt)
    if fail_first and ctx.attempt == 1:
        raise RuntimeError("the first attempt fails")
    return threading.current_thread().name


def logs_process(ctx: TaskContext) -> int:
    """The same, in a child process."""
    logging.getLogger("tests.child").warning("child line from %d", os.getpid())
    ctx.log.info("child ctx line")
    return os.getpid()


def register(yard: Conveyor) -> None:
    """Register every test task type on ``yard``."""
    yard.task(name="t.echo")(echo)
    yard.task(name="t.logs_sync", retries=1, backoff_base_s=0.0)(logs_sync)
    yard.task(name="t.logs_process", executor="process")(logs_process)
    yard.task(name="t.rated", rate="10/s")(echo)
    yard.task(name="t.rated_hourly", rate="2/h")(echo)
    yard.task(name="t.gated")(gated)
    yard.task(name="t.gated_short", timeout_s=0.2)(gated)
    yard.task(name="t.gated_limited", concurrency=2)(gated)
    yard.task(name="t.thread_gated")(thread_gated)
    yard.task(name="t.thread_short", timeout_s=0.2)(thread_gated)
    yard.task(name="t.flaky", retries=2, backoff_base_s=0.0, retry_on=(ConnectionError,))(flaky)
    yard.task(name="t.wrong_kind", retries=3, retry_on=(ConnectionError,))(wrong_kind)
    yard.task(name="t.boom")(boom)
    yard.task(name="t.unserialisable")(unserialisable)
    yard.task(name="t.model")(model_result)
    yard.task(name="t.sync_add")(sync_add)
    yard.task(name="t.cpu_square", executor="process")(cpu_square)
    yard.task(name="t.cpu_forever", executor="process")(cpu_forever)
    yard.task(name="t.cpu_short", executor="process", timeout_s=0.5)(cpu_forever)
    yard.task(name="t.cpu_crash", executor="process")(cpu_crash)
    yard.task(name="t.exits", retries=1, backoff_base_s=0.0)(exits)
    yard.task(name="t.async_exits", retries=1, backoff_base_s=0.0)(async_exits)
    yard.task(name="t.cpu_exits", executor="process")(exits)
    yard.task(name="t.thread_stuck", timeout_s=0.3)(thread_stuck)
    yard.task(name="t.thread_stuck_forever")(thread_stuck)
    yard.task(name="t.thread_stuck_limited", timeout_s=0.3, concurrency=1)(thread_stuck)
    yard.task(name="t.cpu_pid", executor="process")(cpu_pid)
    yard.task(name="t.cpu_sleep", executor="process", timeout_s=3.0)(cpu_sleep)
    yard.task(name="t.fail_after_gate", retries=3, backoff_base_s=0.0, retry_on=(ConnectionError,))(
        fail_after_gate
    )
