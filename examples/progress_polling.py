"""A long task: `202` + id at once, then poll its status and progress.

uvicorn examples.progress_polling:app
curl -X POST 'localhost:8000/reports?pages=5'   → {"task_id": …, "status_url": …}
curl localhost:8000/reports/<id>               → status, progress, message, result
"""

import asyncio
from typing import Annotated, Any

from fastapi import FastAPI, Query, Response

from conveyor import Conveyor, ConveyorError, Settings, TaskContext
from conveyor.api import conveyor_exception_handler

yard = Conveyor(Settings())


@yard.task(timeout_s=600)
async def build_report(
    ctx: TaskContext, pages: int, seconds_per_page: float = 0.05
) -> dict[str, int]:
    for page in range(1, pages + 1):
        await asyncio.sleep(seconds_per_page)  # stands in for real work
        await ctx.progress(100 * page / pages, f"page {page} of {pages}")
    return {"pages": pages}


app = FastAPI(lifespan=yard.lifespan)
app.add_exception_handler(ConveyorError, conveyor_exception_handler)  # unknown id → 404


@app.post("/reports", status_code=202)
async def start_report(
    response: Response,
    pages: Annotated[int, Query(ge=1, le=1000)] = 10,
    seconds_per_page: Annotated[float, Query(ge=0, le=10)] = 0.05,
) -> dict[str, str]:
    handle = await build_report.submit(pages, seconds_per_page=seconds_per_page)
    response.headers["Location"] = f"/reports/{handle.id}"
    return {"task_id": handle.id, "status_url": f"/reports/{handle.id}"}


@app.get("/reports/{task_id}")
async def report_status(task_id: str) -> dict[str, Any]:
    record = await yard.get(task_id)
    return {
        "status": record.status,
        "progress": record.progress,
        "message": record.message,
        "result": record.result,
    }


app.include_router(yard.router())
