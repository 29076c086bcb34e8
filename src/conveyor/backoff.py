"""Retry delays: exponential backoff with jitter (pure)."""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay_s(
    attempt: int,
    *,
    base_s: float = 1.0,
    max_s: float = 300.0,
    jitter: bool = True,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the attempt after ``attempt`` (1-based) failed.

    The delay doubles each attempt from ``base_s``, capped at ``max_s``. With ``jitter``, the
    delay is drawn uniformly from its upper half ("equal jitter"), so retries of many tasks that
    failed together spread out while each still waits at least half the nominal delay.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    delay = min(max_s, base_s * 2.0 ** (attempt - 1))
    if jitter:
        delay = delay / 2 + rand() * delay / 2
    return delay
