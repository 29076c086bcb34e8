"""At most N tasks of a kind at once: the rest wait in the queue, in order.

uvicorn examples.limited_concurrency:app
for i in 1 2 3 4 5 6; do curl -X POST localhost:8000/renders; done
curl 'localhost:8000/tasks?status=running'    → never more than 2
"""

import threading

from fastapi import FastAPI

from conveyor import Conveyor, Settings, TaskContext

yard = Conveyor(Settings())
MAX_RENDERS = 2
_active = 0
_lock = threading.Lock()
peak = 0


@yard.task(concurrency=MAX_RENDERS)
def render(ctx: TaskContext, frames: int = 200_000) -> int:
    global _active, peak
    with _lock:
        _active += 1
        peak = max(peak, _active)
    try:
        return sum(i * i for i in range(frames))  # stands in for heavy work
    finally:
        with _lock:
            _active -= 1


app = FastAPI(lifespan=yard.lifespan)
app.include_router(yard.router())


@app.post("/renders", status_code=202)
async def start_render() -> dict[str, str]:
    handle = await render.submit()
    return {"task_id": handle.id}
