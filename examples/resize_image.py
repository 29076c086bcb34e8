"""The classic thumbnail service (FastAPI + Celery tutorials), on Conveyor, same for its clients.

    uvicorn examples.resize_image:app
    curl -F file=@photo.jpg localhost:8000/resize-image/
        → {"task_id": "…", "status": "Processing"}
    curl localhost:8000/resize-status/<task_id>
        → {"task_id": "…", "status": "Processing"}
        → {"task_id": "…", "status": "Completed", "thumbnail": "<base64 JPEG, within 100x100>"}
        → {"task_id": "…", "status": "Failed", "error": "…"}

The image travels as base64 in the task's arguments, as in the original; for large files, the
ready service's `POST /images` keeps uploads as files instead.
"""

import base64
from typing import Any

from fastapi import FastAPI, HTTPException, UploadFile

from conveyor import Conveyor, ConveyorError, Settings, TaskContext
from conveyor.api import conveyor_exception_handler
from conveyor.jobs.images import Pipeline, Thumbnail, inspect_image, transform

yard = Conveyor(Settings())
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_PIXELS = 40_000_000
THUMBNAIL = Pipeline(operations=[Thumbnail(width=100, height=100)], format="JPEG")


@yard.task(executor="process", timeout_s=60)
def make_thumbnail(ctx: TaskContext, image: str) -> str:
    output, _ = transform(base64.b64decode(image), THUMBNAIL, max_pixels=MAX_PIXELS)
    return base64.b64encode(output).decode()


app = FastAPI(lifespan=yard.lifespan)
app.add_exception_handler(ConveyorError, conveyor_exception_handler)
app.include_router(yard.router())

STATUS = {"queued": "Processing", "running": "Processing", "completed": "Completed"}


@app.post("/resize-image/")
async def resize_image(file: UploadFile) -> dict[str, str]:
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"the image is larger than {MAX_UPLOAD_BYTES} bytes")
    inspect_image(data, max_pixels=MAX_PIXELS)  # 415 unless an image, 413 past the pixel limit
    handle = await make_thumbnail.submit(base64.b64encode(data).decode())
    return {"task_id": handle.id, "status": "Processing"}


@app.get("/resize-status/{task_id}")
async def resize_status(task_id: str) -> dict[str, Any]:
    record = await yard.get(task_id)
    status = STATUS.get(record.status.value, "Failed")
    body: dict[str, Any] = {"task_id": record.id, "status": status}
    if status == "Completed":
        body["thumbnail"] = record.result
    elif status == "Failed":
        body["error"] = (record.error or {}).get("message", "cancelled")
    return body
