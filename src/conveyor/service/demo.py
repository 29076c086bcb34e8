"""Built-in demo task types of the ready service (the classic FastAPI tutorial examples)."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

from pydantic import Field

from ..context import TaskContext
from ..core import Conveyor


def count_primes(n: int) -> int:
    """Primes below ``n`` (a sieve; CPU-bound on purpose)."""
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for i in range(2, math.isqrt(n - 1) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, n, i)))
    return sum(sieve)


def _cpu(ctx: TaskContext, n: Annotated[int, Field(ge=0, le=50_000_000)]) -> int:
    ctx.progress(0, f"counting primes below {n}")
    return count_primes(n)


async def _echo(ctx: TaskContext, value: Any) -> Any:
    return value


async def _sleep(
    ctx: TaskContext,
    seconds: Annotated[float, Field(ge=0, le=3600)],
    steps: Annotated[int, Field(ge=1, le=10_000)] = 10,
) -> dict[str, float]:
    for step in range(steps):
        await asyncio.sleep(seconds / steps)
        ctx.log.info("step %d of %d", step + 1, steps)
        await ctx.progress(100 * (step + 1) / steps, f"step {step + 1} of {steps}")
    return {"slept": seconds}


async def _fail(ctx: TaskContext, message: Annotated[str, Field(max_length=10_000)]) -> None:
    raise ValueError(message)


def register_demo_tasks(yard: Conveyor) -> None:
    """Register ``demo.echo``, ``demo.sleep``, ``demo.fail`` and ``demo.cpu`` on ``yard``."""
    yard.task(name="demo.echo")(_echo)
    yard.task(name="demo.sleep", retries=3, backoff_base_s=0.1)(_sleep)
    yard.task(name="demo.fail")(_fail)
    yard.task(name="demo.cpu", executor="process")(_cpu)
