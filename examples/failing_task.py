"""A task that fails: the error is captured (type, message, traceback) and logged.

uvicorn examples.failing_task:app
curl -X POST localhost:8000/imports -H 'content-type: application/json' -d '{"rows": ["1", "x"]}'
curl localhost:8000/tasks/<id>     → "status": "failed", "error": {"type": "ValueError", …}
"""

from fastapi import FastAPI
from pydantic import BaseModel

from conveyor import Conveyor, Settings, TaskContext

yard = Conveyor(Settings())


@yard.task()
async def import_rows(ctx: TaskContext, rows: list[str]) -> int:
    total = 0
    for number, row in enumerate(rows, start=1):
        try:
            total += int(row)
        except ValueError:
            ctx.log.warning("row %d is not a number: %r", number, row)
            raise ValueError(f"row {number} is not a number: {row!r}") from None
    return total


class ImportRequest(BaseModel):
    rows: list[str]


app = FastAPI(lifespan=yard.lifespan)
app.include_router(yard.router())


@app.post("/imports", status_code=202)
async def start_import(body: ImportRequest) -> dict[str, str]:
    handle = await import_rows.submit(body.rows)
    return {"task_id": handle.id}
