"""A Conveyor with a type limited to 2 running tasks, for workers started with
``conveyor worker --app tests.limited_yard:yard`` (settings from the CONVEYOR_* environment)."""

import asyncio

from conveyor import Conveyor, Settings

yard = Conveyor(Settings())


@yard.task(name="limited.sleep", concurrency=2)
async def limited_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
