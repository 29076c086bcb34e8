"""A timeout: a call that takes too long ends `failed` with type `TimeoutError`.

uvicorn examples.timeout_task:app
curl -X POST 'localhost:8000/fetch?delay_s=5'   → later: "error": {"type": "TimeoutError", …}
"""

import asyncio
from typing import Annotated

from fastapi import FastAPI, Query

from conveyor import Conveyor, Settings, TaskContext

yard = Conveyor(Settings())


@yard.task(timeout_s=0.5)
async def slow_fetch(ctx: TaskContext, delay_s: float) -> str:
    await asyncio.sleep(delay_s)  # stands in for a slow upstream call
    return "fetched"


app = FastAPI(lifespan=yard.lifespan)
app.include_router(yard.router())


@app.post("/fetch", status_code=202)
async def fetch(delay_s: Annotated[float, Query(ge=0, le=60)] = 0.1) -> dict[str, str]:
    handle = await slow_fetch.submit(delay_s)
    return {"task_id": handle.id}
